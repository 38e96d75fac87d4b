"""A continuous-batching engine on the paged KV pool, with per-request compression (KV-Compress style).

    from permkv.engine import Engine, EngineConfig, Request
"""

from permkv.engine.engine import Engine, EngineConfig, EngineStats
from permkv.engine.sequence import Request, Result

__all__ = ["Engine", "EngineConfig", "EngineStats", "Request", "Result"]
