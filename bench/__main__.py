"""`python -m bench <suite> [suite options]`: each suite is a module `bench/<suite>.py`
with a `main(argv)`; it runs its baseline in the same process and writes
`bench/results/<suite>-<card>-<date>.json` plus a PNG plot."""
from __future__ import annotations

import importlib
import pkgutil
import sys

import bench


def suites() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_") and m.name != "common"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = suites()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("suites:", ", ".join(names))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"unknown bench suite {name!r}; valid: {', '.join(names)}", file=sys.stderr)
        return 2
    return importlib.import_module(f"bench.{name}").main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
