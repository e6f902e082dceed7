#!/usr/bin/env bash
# One call of a lent GPU (this workplace's device tool): issue 21's check, with torch.profiler over two bf16
# edits, then issue 19's UltraEdit timing on the Llama-3-8B shape (random weights: timing only), each under its
# own timeout, so that one step's failure leaves the other's numbers. Results under $OUT (8 files come back):
# gpu_check.{out,err,json}, profile/{profile_new,profile_repeat}.txt, profile/trace_repeat.json.gz,
# ultraedit.{out,json}; with COMPILE_SECONDS > 0 a third step, benchmarks/compile_lever.py on a 10-block stack of the
# 8B's width (compile_lever.out). Prepare here with `bash ../shared/gpu/stage.sh`; call with carry [".gpu"]:
#   source .gpu/on-device.sh && bash benchmarks/gpu_session.sh [CHECK_SECONDS=330] [ULTRAEDIT_SECONDS=60] [COMPILE_SECONDS=0]
set -uo pipefail
out=${OUT:-gpu-session}
mkdir -p "$out"
check_s=${1:-330}
ultraedit_s=${2:-60}
compile_s=${3:-0}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout $((check_s + 40)) python3 benchmarks/gpu_check.py --budget "$check_s" --stats-tokens 500000 \
  --json "$out/gpu_check.json" --profile "$out/profile" >"$out/gpu_check.out" 2>"$out/gpu_check.err"
echo "gpu_check: exit $?"
timeout $((ultraedit_s + 60)) python3 benchmarks/ultraedit_scale.py --device cuda --dtype bfloat16 --shape llama3-8b \
  --edits 20000 --seconds "$ultraedit_s" --json "$out/ultraedit.json" >"$out/ultraedit.out" 2>&1
echo "ultraedit_scale: exit $?"
if [ "$compile_s" -gt 0 ]; then
  timeout "$compile_s" python3 benchmarks/compile_lever.py --device cuda --dtype bfloat16 --shape llama3-8b \
    --num-layers 10 --cases 3 >"$out/compile_lever.out" 2>&1
  echo "compile_lever: exit $?"
fi
grep -v "it/s" "$out/ultraedit.out" | tail -15
cat "$out/gpu_check.out"
if [ "$compile_s" -gt 0 ]; then grep -v "^W" "$out/compile_lever.out" | tail -12; fi
