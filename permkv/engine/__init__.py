"""A step-driven serving engine on the paged KV pool, with per-request compression.

    from permkv.engine import Engine, EngineConfig, EngineLoop, Request
"""

from permkv.engine.engine import Engine, EngineConfig, EngineStats
from permkv.engine.loop import EngineLoop, Stream
from permkv.engine.sequence import Request, RequestOutput, Result

__all__ = ["Engine", "EngineConfig", "EngineLoop", "EngineStats", "Request", "RequestOutput", "Result", "Stream"]
