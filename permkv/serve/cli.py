"""The `permkv` command. `permkv serve`: load a model and serve it over an OpenAI-compatible API."""

from __future__ import annotations

import argparse

from permkv.models import BUNDLED, DEFAULT_MODEL


def serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API ")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model to load: a bundled name ({', '.join(sorted(BUNDLED))}), a local folder saved with "
                        "save_pretrained (config.json, safetensors, tokenizer) or a .gguf file; clients ask for it "
                        "by this name (default: %(default)s)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients ask for (default: --model as given)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--ratio", type=float, default=1.0,
                   help="default KV compression ratio (x times smaller, >= 1); requests may override it "
                        "with the extra field kv_cache_compression_ratio")
    p.add_argument("--max-kv-tokens", type=int, default=None,
                   help="per-request KV budget in tokens per head (default: the model's window)")
    p.add_argument("--chunk-tokens", type=int, default=512, help="chunk size of the compressed prefill")
    p.add_argument("--scorer", default="kvzip",
                   help="what compressed requests keep: 'kvzip' (KVzip-style re-reading, one global top-k: the best "
                        "measured; about one more prefill of compute) or an attention scorer ('kvcompress', 'snapkv', ...)")
    p.add_argument("--engine", action="store_true",
                   help="serve from the step-driven engine: concurrent requests join the next step and decode "
                        "together; sampling (temperature) (default: one request at a time, greedy)")
    p.add_argument("--pool-gib", type=float, default=1.0, help="KV pool of the engine, GiB")
    p.add_argument("--step-tokens", type=int, default=2048, help="engine: tokens per step (decodes + prefill chunks)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the GPU if there is one)")


def serve(args: argparse.Namespace) -> None:
    import torch
    import uvicorn

    from permkv.compress import SCORERS, InferenceKVCacheCompression
    from permkv.engine import EngineConfig
    from permkv.models import load_model
    from permkv.rlm import EngineBackend, SequentialBackend
    from permkv.serve import create_app

    if args.scorer not in SCORERS:
        raise SystemExit(f"permkv serve: unknown scorer {args.scorer!r}; one of {sorted(SCORERS)}")
    compression = InferenceKVCacheCompression(scorer=args.scorer)  # with its best measured allocator
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer, spec = load_model(args.model, device=args.device)
    except ValueError as err:  # a wrong name or path, an architecture permkv cannot run: say so, no traceback
        raise SystemExit(f"permkv serve: --model: {err}") from None
    name = args.served_model_name or spec.name
    if args.engine:
        config = EngineConfig(step_tokens=args.step_tokens, chunk_tokens=args.chunk_tokens, compression=compression)
        backend = EngineBackend(model, tokenizer, spec, name=name, pool_bytes=int(args.pool_gib * 2**30),
                                max_kv_tokens=args.max_kv_tokens, config=config)
    else:
        backend = SequentialBackend(model, tokenizer, spec, name=name, max_kv_tokens=args.max_kv_tokens,
                                    chunk_tokens=args.chunk_tokens, compression=compression)
    print(f"permkv: serving {name} on http://{args.host}:{args.port}/v1 (default ratio {args.ratio:g})", flush=True)
    uvicorn.run(create_app(backend, args.ratio), host=args.host, port=args.port, log_level="info")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="permkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args)


if __name__ == "__main__":
    main()
