"""Thin wrapper: `python scripts/finetune.py ...` is `amc finetune ...` (`--config FILE` accepted)."""

from amc.cli import script_main

if __name__ == "__main__":
    script_main("finetune")
