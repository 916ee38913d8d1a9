"""Prints the requirements of one optional-dependency group of pyproject.toml."""

import sys

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
print(" ".join(project["optional-dependencies"][sys.argv[1]]))
