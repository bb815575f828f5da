#!/bin/bash
# The device call behind docs/benchmarks.md "Session 3" (run as `DEADLINE=545 bash .dev/gpu.sh` on the
# lent GPU machine, with wheels, Fashion-MNIST and the base checkpoints carried in .dev/). Issue #13: 25%- then 50%-FLOPs rows (ResNet-20, Plain-20, MobileNet v1) with 400-episode
# searches, 3 seeds of AMC and of random search, the rules, 2-epoch fine-tuning; all jobs of a row
# in parallel on the GPU. Stops itself at DEADLINE seconds and packs what it has into $OUT.
# Local dry run: PY=/work/main/.venv/bin/python SKIP_INSTALL=1 DEVICE=cpu EPISODES=3 OUT=/tmp/out bash .dev/gpu.sh
set -u
T0=$(date +%s)
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
EPISODES=${EPISODES:-400}
WARMUP=${WARMUP:-100}
FT=${FT:-2}
DEADLINE=${DEADLINE:-540}
WORKERS=${WORKERS:-8}
TARGETS=${TARGETS:-"0.25 0.5"}
ROWS=${ROWS:-"resnet20 plain20 mobilenet"}
export PYTHONUNBUFFERED=1 AMC_NO_PROGRESS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT"
LOG=$OUT/log.txt
exec > >(tee -a "$LOG") 2>&1
left() { echo $((DEADLINE - ($(date +%s) - T0))); }

if [ -z "${SKIP_INSTALL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/whl/*.whl || exit 3
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/amcpkg . || exit 4
  export PYTHONPATH=/tmp/amcpkg:/tmp/site
  # worker processes put the repo root first on sys.path: make its amc/ whole as installed
  ln -sfn ../envs amc/envs; ln -sfn ../agents amc/agents
fi
nvidia-smi --query-gpu=name,memory.used --format=csv 2>/dev/null
if [ "$DEVICE" = cuda ]; then  # MPS lets the jobs' small kernels run side by side; off again if CUDA breaks under it
  nvidia-cuda-mps-control -d && echo "MPS started"
  timeout 60 $PY -c "import torch; print('cuda ok', torch.ones(2, device='cuda').sum().item())" \
    || { echo quit | nvidia-cuda-mps-control; echo "MPS off"; }
fi
$PY -c "import torch, amc, gymnasium, stable_baselines3, torch_pruning; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'cores', __import__('os').cpu_count())" || exit 5

COMMON="--finetune-epochs $FT --set device=$DEVICE --set data.root=.dev/fmnist --set agent.warmup_episodes=$WARMUP --set search.prune_residual=true"

# smoke: 3 episodes of the first row, timed, before anything else
s=$(date +%s); rm -rf /tmp/smoke
$PY scripts/benchmark.py --config configs/resnet20_fmnist.yaml $COMMON --targets 0.25 --episodes 3 --set agent.warmup_episodes=2 \
    --seeds 0 --methods amc --finetune-epochs 0 --set model.checkpoint=.dev/ckpt/resnet20_fmnist_split.pt \
    --out /tmp/smoke || { echo "SMOKE FAILED"; exit 6; }
echo "smoke: $(( $(date +%s) - s )) s"; cat /tmp/smoke/results.md
grep -h seconds /tmp/smoke/runs/*/episodes.csv | head -1; tail -n 3 /tmp/smoke/runs/*/episodes.csv

row_chain() {  # one row's targets in turn, each a benchmark with all its jobs in parallel
  for target in $TARGETS; do
    [ "$(left)" -gt 60 ] || return
    timeout --signal=TERM --kill-after=10 "$(left)" $PY scripts/benchmark.py --config configs/$1_fmnist.yaml $COMMON \
        --targets "$target" --episodes "$EPISODES" --seeds 0 1 2 --methods uniform global deep shallow amc random \
        --workers "$WORKERS" --set model.checkpoint=.dev/ckpt/$1_fmnist_split.pt --out "bench/$1" >> "bench_$1.log" 2>&1
  done
}
pids=()
for row in $ROWS; do row_chain "$row" & pids+=($!); done
alive() { for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while [ "$(left)" -gt 0 ] && alive; do
  sleep 20
  echo "t=$(( $(date +%s) - T0 )) s: $(for r in $ROWS; do echo -n "$r $(cat bench/$r/runs/*/episodes.csv 2>/dev/null | wc -l) csv lines, $(grep -o '"method"' bench/$r/results.json 2>/dev/null | wc -l) jobs done | "; done)"
done
wait "${pids[@]}"
for row in $ROWS; do echo "== $row"; tail -n 5 "bench_$row.log" | cut -c1-400; cat "bench/$row/results.md" 2>/dev/null; done

# pack: recorded jobs' runs without their agent, unrecorded runs whole (resumable)
$PY - <<'PYEOF'
import json, pathlib
for results in pathlib.Path("bench").glob("*/results.json"):
    for r in json.loads(results.read_text()):  # recorded jobs need no agent to resume
        agent = results.parent / "runs" / f"{r['method']}_t{r['target']}_s{r['seed']}" / "agent.pt"
        agent.unlink(missing_ok=True)
PYEOF
find bench -name tb -type d -prune -exec rm -rf {} +
tar czf /tmp/bench.tgz bench bench_*.log
if [ "$(stat -c %s /tmp/bench.tgz)" -gt 60000000 ]; then  # over what comes back: drop the unfinished 50% agents
  find bench -path '*_t0.5_*' -name agent.pt -delete; tar czf /tmp/bench.tgz bench bench_*.log
fi
ls -la /tmp/bench.tgz
split -b 15m -d /tmp/bench.tgz "$OUT/bench.tgz.part"
echo "total $(( $(date +%s) - T0 )) s"
