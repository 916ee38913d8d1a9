#!/usr/bin/env bash
# Release artefacts into OUTDIR (emptied first):
#   - one abi3 wheel for CPython 3.9+ on x86_64 Linux, tagged manylinux2014 (glibc 2.17): maturin
#     links it with zig against glibc 2.17's symbols (the ziglang package, no system toolchain);
#   - the sdist.
# Then checks that `twine check` passes on both and that the wheel's extension needs no glibc
# symbol newer than 2.17. Needs maturin, ziglang and twine on PATH (the release group of pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/build-wheels.sh OUTDIR}"
rm -rf "$OUT"
mkdir -p "$OUT"
maturin build --release --zig --compatibility manylinux2014 -i "$(command -v python3)" -o "$OUT"
maturin sdist -o "$OUT"
twine check --strict "$OUT"/*
WHEEL=$(ls "$OUT"/*.whl)
case "$WHEEL" in
  *-cp39-abi3-manylinux2014_x86_64*) ;;
  *) echo "unexpected wheel tag: $WHEEL" >&2; exit 1 ;;
esac
python3 - "$WHEEL" <<'PY'
import re, subprocess, sys, tempfile, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, tempfile.TemporaryDirectory() as d:
    sos = [n for n in z.namelist() if n.endswith(".so")]
    assert sos == ["tokengate/_tokengate.abi3.so"], sos
    path = z.extract(sos[0], d)
    syms = subprocess.run(["objdump", "-T", path], check=True, capture_output=True, text=True).stdout
    versions = sorted({tuple(map(int, v.split("."))) for v in re.findall(r"GLIBC_([0-9.]+)", syms)})
    newest = ".".join(map(str, versions[-1]))
    assert versions[-1] <= (2, 17), f"the extension needs glibc {newest}"
    print(f"wheel: {sys.argv[1].rsplit('/', 1)[-1]}; newest glibc symbol: {newest}")
PY
ls -l "$OUT"
