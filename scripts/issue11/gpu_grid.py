"""Issue 11 on a lent GPU (or this CPU, --device cpu): niah_single, SmolLM2 (or --model), one prefill per sample and mode (`answer_sample`), the
headline against kvpress and random at 2x/8x/64x, cells interleaved sample by sample so that a time budget
stops every cell at about the same n. Writes <out>/grid_<tag>.json (per-answer rows, environment, wall time) after
every sample; summaries are made afterwards, on the CPU. Decoding one answer is launch-bound on a GPU, so
several processes (one per slice of samples, lengths and modes) share it.

    PYTHONPATH=. python scripts/issue11/gpu_grid.py --out /tmp/g --lengths 8192 --start 0 --stop 25 --budget-s 460
"""

import argparse
import json
import time
from pathlib import Path

import torch

from permkv.data import build_task
from permkv.experiments.compression_quality import answer_sample
from permkv.models import load_model

METHODS = {"query_aware": ["permkv", "kvpress_snapkv", "kvpress_streaming", "permkv_random"],
           "query_agnostic": ["permkv", "kvpress_streaming", "kvpress_snapkv", "permkv_random", "permkv_kvzip_global"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 2048])
    ap.add_argument("--n", type=int, default=50, help="samples in the seeded set")
    ap.add_argument("--start", type=int, default=0, help="first sample of this process's slice")
    ap.add_argument("--stop", type=int, default=None, help="end of the slice (default n)")
    ap.add_argument("--modes", nargs="+", default=list(METHODS))
    ap.add_argument("--methods", nargs="+", default=None, help="instead of the per-mode defaults (METHODS)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ratios", type=float, nargs="+", default=[2, 8, 64])
    ap.add_argument("--budget-s", type=float, default=460, help="stop starting samples after this many seconds")
    ap.add_argument("--device", default=None)
    ap.add_argument("--model", default="smollm2-135m", help="a model name of permkv.models (gemma3-270m: its global layers are compressed)")
    args = ap.parse_args()

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    tag = ("" if args.model == "smollm2-135m" else f"{args.model}_") + f"{'_'.join(map(str, args.lengths))}_{'_'.join(m.split('_')[1] for m in args.modes)}_{args.start}"
    try:
        import kvpress  # noqa: F401
        press_error = None
    except Exception as e:  # report, and run our own methods only
        press_error = f"{type(e).__name__}: {e}"
    methods = {m: [x for x in args.methods or METHODS[m] if press_error is None or not x.startswith("kvpress")]
               for m in args.modes}
    model, tok, spec = load_model(args.model, device=args.device)
    import transformers
    env = dict(device=str(model.device), gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               torch=torch.__version__, transformers=transformers.__version__, kvpress_error=press_error,
               load_s=time.perf_counter() - t_start)
    print(env, flush=True)
    samples = {L: build_task("niah_single", tok, spec, args.n, L, seed=0) for L in args.lengths}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, done, t0 = [], {}, time.perf_counter()
    # longest length first, both modes, sample by sample; a shorter length only once the longer is complete
    for L in args.lengths:
        for i in range(args.start, args.stop or args.n):
            for mode in args.modes:
                if time.perf_counter() - t_start > args.budget_s:
                    return  # grid_<tag>.json already holds every finished sample
                ts = time.perf_counter()
                for r in answer_sample(model, tok, samples[L][i], spec, mode, methods[mode], args.ratios, 32):
                    rows.append(dict(model=spec.name, context_tokens=L, sample=i,
                                     **{k: v for k, v in r.items() if k != "kept"}))
                done[f"{L}/{mode}"] = i + 1
                (out / f"grid_{tag}.json").write_text(json.dumps(dict(env=env, methods=methods, done=done,
                                                               wall_s=time.perf_counter() - t0, rows=rows)))
                print(f"{L} {mode} sample {i}: {time.perf_counter() - ts:.1f} s (total {time.perf_counter() - t_start:.0f} s)",
                      flush=True)


if __name__ == "__main__":
    main()
