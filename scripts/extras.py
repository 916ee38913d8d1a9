"""Prints the requirements of one optional-dependency group (``extras.py test``) or one
dependency group (``extras.py --group lint``) of pyproject.toml."""

import sys

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

with open("pyproject.toml", "rb") as f:
    pyproject = tomllib.load(f)
if sys.argv[1] == "--group":
    print(" ".join(pyproject["dependency-groups"][sys.argv[2]]))
else:
    print(" ".join(pyproject["project"]["optional-dependencies"][sys.argv[1]]))
