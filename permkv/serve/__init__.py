"""`permkv serve`: an OpenAI-compatible HTTP server over a small backend protocol.

    permkv serve --model smollm2-135m --ratio 8 --port 8000      # or: python -m permkv.serve ...
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "kv_cache_compression_ratio": 4}'
"""

from permkv.serve.app import APIError, create_app, free_port, running
from permkv.rlm.backend import Backend, ContextTooLong, Generation, SequentialBackend, check_request

__all__ = [
    "APIError", "Backend", "ContextTooLong", "Generation", "SequentialBackend", "check_request", "create_app",
    "free_port", "running",
]
