"""Thin wrapper: `python scripts/search.py ...` is `amc search ...` (`--config FILE` accepted)."""

from amc.cli import script_main

if __name__ == "__main__":
    script_main("search")
