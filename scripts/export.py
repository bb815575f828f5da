"""Thin wrapper: `python scripts/export.py ...` is `amc export ...` (`--config FILE` accepted)."""

from amc.cli import script_main

if __name__ == "__main__":
    script_main("export")
