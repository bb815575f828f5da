"""Pool the paired differences of several benchmark rows: does AMC lead across rows where no one row can tell?

A row (a ``scripts/benchmark.py --out`` folder) pairs each AMC search with the random search of the
same seed, and with the rules on the same base model. With a few bases per row, a lead of a
quarter point has an interval wider than itself; pooled over rows of one family (e.g. MobileNet v2
at three widths), the bases together say whether the lead is there at all. The pooled interval
treats every row's bases as one sample of that family: it answers "does the agent lead on such
models", not "on this row" (each row's own line answers that).

    python scripts/pool_rows.py docs/results/round2_mobilenetv2_t025/bases \
        docs/results/round2_mobilenetv2w05_t025/bases --target 0.25

Prints, per row and pooled, AMC's answer minus random search's, the uniform rule's and the global
rule's on test before and after fine-tuning: mean [95% t interval], the standard deviation of the
per-base differences, and on how many bases AMC is ahead, level and behind.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from benchmark import differences_to_rule, mean_interval, measured, point_differences, read_records

from amc.report import table

KEYS = {"test before FT": "test_top1_before_ft", "test after FT": "test_top1_after_ft"}
BASELINES = ("random", "uniform", "global")


def row_differences(records: list[dict], baseline: str, key: str, target: float) -> list[float]:
    """AMC minus ``baseline`` in points: random search by seed, a rule by base; records without ``key``
    (not fine-tuned) are left out."""
    def of(method: str) -> list[dict]:
        return measured([r for r in records if r["method"] == method and r["target"] == target], key)

    amc = of("amc")
    if baseline == "random":
        by_seed = [{r["seed"]: r for r in rs} for rs in (amc, of("random"))]
        return point_differences(*by_seed, key, sorted(set(by_seed[0]) & set(by_seed[1])))
    return differences_to_rule(amc, of(baseline), key)


def describe(diffs: list[float]) -> list[str]:
    if not diffs:
        return ["-", "-", "-"]
    spread = f"{statistics.stdev(diffs):.2f}" if len(diffs) > 1 else "-"
    counts = f"{sum(d > 0 for d in diffs)} / {sum(d == 0 for d in diffs)} / {sum(d < 0 for d in diffs)}"
    return [mean_interval(diffs), spread, counts]


def pool(rows: dict[str, list[dict]], target: float) -> str:
    lines = []
    for split, key in KEYS.items():
        for baseline in BASELINES:
            pooled = []
            for name, records in rows.items():
                diffs = row_differences(records, baseline, key, target)
                pooled += diffs
                lines.append([f"AMC - {baseline}", split, name, len(diffs), *describe(diffs)])
            lines.append([f"AMC - {baseline}", split, "**pooled**", len(pooled), *describe(pooled)])
    return table(["difference", "on", "row", "bases", "mean [95% interval] (points)", "sd", "ahead / level / behind"],
                 lines, markdown=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows", nargs="+", type=Path, help="benchmark --out folders (each holds results.json)")
    p.add_argument("--target", type=float, default=0.25, help="the budget whose records are pooled")
    args = p.parse_args(argv)
    rows = {}
    for folder in args.rows:
        path = folder / "results.json"
        if not path.is_file():
            print(f"pool_rows: {folder}: no results.json (not a benchmark --out folder)", file=sys.stderr)
            return 2
        rows[str(folder)] = read_records(path)
    print(pool(rows, args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
