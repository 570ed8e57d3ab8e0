#!/usr/bin/env bash
# The GPU check, in one go (≤ 8 minutes on one GPU): the demo build with run.device = cuda, then
# bench/train.py (saev 0.1.0 as the baseline), bench/exemplars.py and bench/record.py on the GPU,
# then every ratio they printed.
#
#   bash bench/gpu_check.sh                      # on a GPU machine: the full demo and benchmarks
#   bash bench/gpu_check.sh --device cpu --quick # the same steps at seconds-scale sizes (CI, laptops)
#
# Options: --device cuda|cpu (default cuda), --quick (small sizes: the tiny end-to-end spec and
# each benchmark's --quick), --out DIR (default a temp folder; the demo run and logs go there).
# Environment: SAEV_PYTHON, a python that imports saev 0.1.0 (default: /tmp/saev-venv/bin/python,
# made as bench/train.py's docstring says when pip can reach PyPI; without it the saev column
# is skipped and the summary says so); SAEV_REPORT_CACHE, the shared cache (demo set, converted
# weights; built on first use). A failing step is reported and the others still run; the exit
# status is the number of failed steps.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE=cuda
QUICK=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$(mktemp -d -t gpu-check-XXXXXX)}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SAEV_REPORT_PROGRESS=0
cd "$ROOT"

echo "gpu_check: device $DEVICE, quick $QUICK, output $OUT"
$PY - "$DEVICE" <<'EOF' || exit 1
import sys, torch
device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("torch sees no CUDA GPU: run with --device cpu")
name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
print(f"torch {torch.__version__} on {name}")
EOF

# saev 0.1.0 for bench/train.py's baseline: a python that imports it, made once if pip can.
SAEV_PY="${SAEV_PYTHON:-/tmp/saev-venv/bin/python}"
if ! "$SAEV_PY" -c "import saev" 2>/dev/null; then
  echo "saev 0.1.0 not importable from $SAEV_PY; trying to make /tmp/saev-venv (needs PyPI)"
  SAEV_PY=/tmp/saev-venv/bin/python
  { python3 -m venv --system-site-packages /tmp/saev-venv \
      && /tmp/saev-venv/bin/pip install -q --no-deps saev==0.1.0 \
      && /tmp/saev-venv/bin/pip install -q einops beartype jaxtyping; } >"$OUT/saev-venv.log" 2>&1
  "$SAEV_PY" -c "import saev" 2>/dev/null || SAEV_PY="$PY"
fi

FAILED=0
step() {  # step NAME COMMAND...: run, time, keep the log, never stop the script
  local name="$1"; shift
  local started=$SECONDS
  echo; echo "=== $name: $*"
  if "$@" 2>&1 | tee "$OUT/$name.log"; then
    echo "=== $name: ok in $((SECONDS - started)) s"
  else
    echo "=== $name: FAILED after $((SECONDS - started)) s (log: $OUT/$name.log)"
    FAILED=$((FAILED + 1))
  fi
}

# 1. the demo (quick: the tiny end-to-end spec) with run.device set, in $OUT/runs
SPEC_IN="specs/demo.yaml"; [ "$QUICK" = 1 ] && SPEC_IN="tests/data/tiny_e2e.yaml"
$PY - "$SPEC_IN" "$OUT/demo.yaml" "$DEVICE" "$OUT/runs" <<'EOF'
import sys, yaml
source, target, device, out_dir = sys.argv[1:]
spec = yaml.safe_load(open(source))
spec["run"].update(device=device, out_dir=out_dir, name="gpu_check")
open(target, "w").write(yaml.safe_dump(spec, sort_keys=False))
EOF
step demo $PY -m saev_report.cli build "$OUT/demo.yaml"

# 2. the benchmarks on the device
if [ "$QUICK" = 1 ]; then
  step train "$SAEV_PY" bench/train.py --device "$DEVICE" --quick --scales demo --agreement-steps 0
  step exemplars $PY bench/exemplars.py --device "$DEVICE" --quick
  step record $PY bench/record.py --device "$DEVICE" --quick --rounds 1
else
  step train "$SAEV_PY" bench/train.py --device "$DEVICE" --agreement-steps 0
  step exemplars $PY bench/exemplars.py --device "$DEVICE" --patches 401408
  step record $PY bench/record.py --device "$DEVICE"
fi

echo; echo "=== every ratio ($DEVICE)"
for name in train exemplars record; do
  [ -f "$OUT/$name.log" ] && grep -i "ratio\|×\|of it\|limit" "$OUT/$name.log" | sed "s/^/[$name] /"
done
grep -q "saev 0.1.0 not importable" "$OUT/train.log" 2>/dev/null && echo "[train] NOTE: saev 0.1.0 was not importable, so the saev baseline is missing"
[ -f "$OUT/demo.log" ] && grep -E "^done|site:" "$OUT/demo.log" | sed "s/^/[demo] /"
echo "=== $FAILED step(s) failed; logs in $OUT"
exit "$FAILED"
