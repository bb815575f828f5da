"""Thin wrapper: `python scripts/train.py ...` is `amc train ...` (`--config FILE` accepted)."""

from amc.cli import script_main

if __name__ == "__main__":
    script_main("train")
