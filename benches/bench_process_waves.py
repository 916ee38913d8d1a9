"""The proof's waves on the process lane, beside the least any design pays to return results.

    python benches/bench_process_waves.py [--tokens 8192] [--rounds 5] [--workers 2] [--json out.json]

One wave of the proof's four operations (``tokengate.proof.wave_args``: cpu_crunch,
string_transform, data_sort, hash_chain; about 0.1 ms each, their results returned),
run in the same rounds, in rotating order, by:

* **loop**: a plain loop in this process (the proof's baseline);
* **process lane**: tokengate's, the wave submitted token by token, then ``tokengate.gather``;
* **pipeline**: a hand-written floor: ``--workers`` fresh interpreters started once, each sent
  its share of the wave as one message, split in advance into shares of equal work (groups of
  four consecutive tokens, one of each operation, dealt in turn), which run it and send the
  results back pickled in batches of 32; this process only unpickles them. No queue, no
  scheduling, no per-token bookkeeping, no balancing: what returning the results costs on
  this machine and nothing else;
* **ProcessPoolExecutor.map** (spawn, same workers, ``chunksize`` 64): the standard library's
  batched path;
* **process lane map(chunksize=64)**: tokengate's batched path, ``fn.map(items, chunksize=64)``
  on a process-lane function running one item (one token a chunk, as the line above).

Reports each against the loop (median and range over the rounds), and the process lane
against the pipeline. The proof's goal (1.6x the loop on 2 cores) sits close to the
pipeline's own figure: a miss there is measured here against what is possible at all.
"""

from __future__ import annotations

import argparse
import os
import pickle
import selectors
import statistics
import struct
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import dump, machine, table

import tokengate
from tokengate import proof

#: Frames: an 8-byte little-endian length, then a pickle.
_LEN = struct.Struct("<q")
_BATCH = 32
#: A pipeline worker silent this long is taken for stuck: the bench stops with an error.
_STALL_S = 60.0

#: The pipeline's worker: reads a share (a pickled list of (operation index, args)), runs it,
#: writes the results in pickled batches of _BATCH; exits at EOF.
_CHILD = f"""
import os, pickle, struct, sys
from tokengate import proof
ops = proof.WAVE_OPERATIONS
LEN = struct.Struct("<q")
rf, wf = os.fdopen(0, "rb", buffering=0), os.fdopen(1, "wb", buffering=0)
def read(k):
    b = bytearray()
    while len(b) < k:
        c = rf.read(k - len(b))
        if not c:
            sys.exit(0)
        b += c
    return bytes(b)
while True:
    share = pickle.loads(read(LEN.unpack(read(8))[0]))
    out = []
    for j, (k, args) in enumerate(share):
        out.append(ops[k](*args))
        if len(out) == {_BATCH} or j == len(share) - 1:
            data = pickle.dumps(out, 5)
            wf.write(LEN.pack(len(data)) + data)
            out = []
"""


def run_item(item: tuple[int, tuple[Any, ...]]) -> Any:
    """One token of the wave (for ProcessPoolExecutor.map)."""
    k, args = item
    return proof.WAVE_OPERATIONS[k](*args)


#: ``run_item`` on the process lane (for its ``map(chunksize=...)``).
run_item_on_lane = tokengate.task_token_guard(operation_type="bench.run_item", tags={"process_pool": True})(run_item)


class Pipeline:
    """The hand-written floor: ``n`` interpreters, each given an equal share of the work up front."""

    def __init__(self, n: int) -> None:
        self.procs = [
            subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
            for _ in range(n)
        ]

    @staticmethod
    def _read(f: Any, k: int) -> bytes:
        b = bytearray()
        while len(b) < k:
            c = f.read(k - len(b))
            if not c:
                raise RuntimeError("a pipeline worker exited")
            b += c
        return bytes(b)

    def run(self, items: list[tuple[int, tuple[Any, ...]]]) -> list[Any]:
        n = len(self.procs)
        # Groups of 4 consecutive tokens hold one token of each operation: dealt in turn,
        # they give every worker the same work.
        shares = [[it for j, it in enumerate(items) if (j // 4) % n == s] for s in range(n)]
        sel = selectors.DefaultSelector()
        left: dict[Any, int] = {}
        for p, share in zip(self.procs, shares):
            if share:
                assert p.stdin is not None and p.stdout is not None
                data = pickle.dumps(share, 5)
                p.stdin.write(_LEN.pack(len(data)) + data)
                sel.register(p.stdout, selectors.EVENT_READ)
                left[p.stdout] = len(share)
        results: list[Any] = []
        while left:
            events = sel.select(_STALL_S)
            if not events:
                raise RuntimeError(f"no pipeline worker answered for {_STALL_S:.0f} s")
            for key, _ in events:
                f = key.fileobj
                batch = pickle.loads(self._read(f, _LEN.unpack(self._read(f, 8))[0]))
                results.extend(batch)
                left[f] -= len(batch)
                if not left[f]:
                    del left[f]
                    sel.unregister(f)
        sel.close()
        return results

    def close(self) -> None:
        for p in self.procs:
            assert p.stdin is not None
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:  # stuck writing results nobody reads (after an error)
                p.kill()
                p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    info = machine()
    items = [proof.wave_args(i) for i in range(args.tokens)]
    ops = proof._PROCESS_WAVE_OPS
    names = ["loop", "process lane", "pipeline", "ProcessPoolExecutor.map", "process lane map(chunksize=64)"]
    times: dict[str, list[float]] = {n: [] for n in names}
    pipeline = Pipeline(args.workers)
    try:
        with (
            tokengate.OperationsCoordinator(process_workers=args.workers),
            ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as ppe,
        ):

            def lane() -> None:
                tokengate.gather([ops[k](*a) for k, a in items])

            runs = {
                "loop": lambda: [proof.WAVE_OPERATIONS[k](*a) for k, a in items],
                "process lane": lane,
                "pipeline": lambda: pipeline.run(items),
                "ProcessPoolExecutor.map": lambda: list(ppe.map(run_item, items, chunksize=64)),
                "process lane map(chunksize=64)": lambda: list(run_item_on_lane.map(items, chunksize=64)),
            }
            # Warm-up (starts the lane's processes), checking every runner's results against the
            # loop's: a runner that lost work would only look fast. The pipeline's come back in
            # the order its workers answer.
            warm = items[: min(len(items), 512)]
            expected = [proof.WAVE_OPERATIONS[k](*a) for k, a in warm]
            got = {
                "process lane": tokengate.gather([ops[k](*a) for k, a in warm]),
                "pipeline": pipeline.run(warm),
                "ProcessPoolExecutor.map": list(ppe.map(run_item, warm, chunksize=64)),
                "process lane map(chunksize=64)": list(run_item_on_lane.map(warm, chunksize=64)),
            }
            for name, values in got.items():
                if sorted(map(repr, values)) != sorted(map(repr, expected)):
                    raise SystemExit(f"{name} returned other results than the loop")
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    t0 = time.perf_counter()
                    out = runs[name]()
                    times[name].append(time.perf_counter() - t0)
                    del out
    finally:
        pipeline.close()
    loop = times["loop"]
    med = statistics.median
    rows = [("loop", f"{med(loop) * 1e3:.0f} ms", "1.00x", "")]
    ratios: dict[str, list[float]] = {}
    for name in names[1:]:
        # Each round against that round's loop: the machine's speed drifts between rounds.
        ratios[name] = [lo / t for lo, t in zip(loop, times[name])]
        rs = ratios[name]
        rows.append((name, f"{med(times[name]) * 1e3:.0f} ms", f"{med(rs):.2f}x", f"{min(rs):.2f}-{max(rs):.2f}"))
    of_floor = [p / f for p, f in zip(ratios["process lane"], ratios["pipeline"])]
    print(f"machine: {info}")
    print(f"{args.tokens} tokens a wave, {args.workers} worker processes, {args.rounds} rounds (median; range)\n")
    print(table(rows, ("runner", "wave", "vs loop", "range")))
    print(
        f"\nprocess lane / pipeline, round by round: {' '.join(f'{x:.2f}' for x in of_floor)} "
        f"(median {med(of_floor):.2f}); the proof's goal 1.6x is {1.6 / med(ratios['pipeline']):.2f} of the pipeline's"
    )
    dump(
        args.json,
        {"machine": info, "tokens": args.tokens, "times_s": times, "vs_loop": ratios, "lane_of_pipeline": of_floor},
    )


if __name__ == "__main__":
    main()
