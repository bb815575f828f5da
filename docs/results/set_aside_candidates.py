"""Per run: the searched candidate that led on the selection split (the one the margin set aside) and the
best rule there, each exported as export does and measured on test (on the CPU). Made the
set_aside_candidates.jsonl files beside the session-3 results, run from the benchmark's directory:

    python docs/results/set_aside_candidates.py bench/resnet20/runs/*_t0.25_* bench/plain20/runs/*_t0.25_* \
        bench/resnet20/runs/amc_t0.5_* bench/plain20/runs/amc_t0.5_*
"""
import json, sys
from pathlib import Path
from amc.export import measure, prune_policy
from amc.factory import Workspace
from amc.search import load_run_config
for run in map(Path, sys.argv[1:]):
    best = json.loads((run / "best_policy.json").read_text())
    sel = best["selection"]
    top = max((c for c in sel["candidates"] if c["source"] == "search"), key=lambda c: c["select_metric"])
    rule = max((c for c in sel["candidates"] if c["source"] != "search"), key=lambda c: c["select_metric"])
    cfg = load_run_config(run, overrides=["device=cpu"])
    ws = Workspace(cfg)
    out = {}
    for name, c in (("search", top), (rule["source"], rule)):
        model, _ = prune_policy(ws, c["keep"])
        out[name] = measure(model, ws, splits=("test",))["test_top1"]
    print(json.dumps({"run": str(run), "episode": top["episode"], "select_lead": top["select_metric"] - rule["select_metric"],
                      "test_search": out["search"], "test_rule": out[rule["source"]], "rule": rule["source"],
                      "test_diff": out["search"] - out[rule["source"]]}), flush=True)
