"""Recursive verification under a KV budget: a reasoning trace compressed while it is written
(R-KV), its claims checked by factored sub-calls against the input (Chain-of-Verification), the
answer revised from the checked claims.
"""

from permkv.rvs.decode import BudgetedDecoder, TraceStats, held_tokens
from permkv.rvs.scorers import RKVScore, redundancy
from permkv.rvs.verify import (
    RecursiveVerificationSystem, RVSResult, RVSStats, VerifiedClaim, list_prompt, next_prompt, parse_items,
)

__all__ = [
    "BudgetedDecoder", "RKVScore", "RVSResult", "RVSStats", "RecursiveVerificationSystem", "TraceStats", "VerifiedClaim",
    "held_tokens", "list_prompt", "next_prompt", "parse_items", "redundancy",
]
