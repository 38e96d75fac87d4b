"""SuffixDecoding's draft source (Oliaro et al., arXiv 2411.04975): frequency-scored draft trees from a
suffix index over the prompt, the output so far and, optionally, earlier outputs.

- `SuffixIndex`: every pattern of up to `max_pattern` tokens of a token list -> where it ended (a suffix
  tree cut at that depth, kept as a hash of its paths).
- `SuffixDraft`: the `DraftSource`: match suffixes of the text, merge what followed their recent
  occurrences into trees weighted by how often each continuation occurred, and verify as much of the
  best tree as the measured verify cost (`VerifyCost`) says pays, or nothing.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from permkv.checks import positive_int
from permkv.speculate.cost import VerifyCost
from permkv.speculate.drafts import DraftTree

SEPARATOR = -1  # ends a document in a SuffixIndex; never a token id, so no pattern or continuation crosses it


class SuffixIndex:
    """Where every pattern of up to `max_pattern` tokens of a growing token list occurred.

    A suffix tree cut at depth `max_pattern`, kept as a hash of its paths: `ends[pattern]` lists the
    position just after each occurrence, oldest first. What followed an occurrence is read from
    `tokens`, so continuations of any length cost no memory of their own. Appending a token costs
    O(max_pattern) patterns. Documents added with `add_document` are kept apart by `SEPARATOR`.
    """

    def __init__(self, max_pattern: int = 16):
        self.max_pattern = positive_int("max_pattern", max_pattern)
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], list[int]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, new) -> None:
        """Append tokens and register every pattern that ends at each of them."""
        toks, ends = self.tokens, self.ends
        for tok in new:
            toks.append(tok)
            j = len(toks)
            for n in range(1, min(self.max_pattern, j) + 1):
                if toks[j - n] == SEPARATOR:  # the pattern would cross a document boundary
                    break
                ends.setdefault(tuple(toks[j - n : j]), []).append(j)

    def add_document(self, ids) -> None:
        """Append a whole document (e.g. a finished output), closed by a separator."""
        self.extend(list(ids) + [SEPARATOR])

    def continuations(self, pattern, depth: int, limit: int) -> list[list[int]]:
        """What followed the `limit` most recent occurrences of `pattern`: up to `depth` tokens each, none empty."""
        out = []
        for end in reversed(self.ends.get(tuple(pattern), ())):
            cont = self.tokens[end : end + depth]
            if SEPARATOR in cont:
                cont = cont[: cont.index(SEPARATOR)]
            if cont:
                out.append(cont)
                if len(out) == limit:
                    break
        return out


def _bucket(match: int) -> int:
    """Match lengths 1, 2-3, 4-7, 8-15, 16+ -> 1..5: acceptance is learned per bucket."""
    return min(match, 16).bit_length()


# Chance that SmolLM2-135M's greedy token is the one that followed the matched text, per match-length
# bucket, measured on 32 design prompts (notebook 04's workloads at seed 1, 8 other open-ended prompts;
# not the evaluation prompts): a 1-token match is right 1 time in 5, a 16-token match 97 times in 100.
# A node d tokens below a match of m extends it to m + d - 1 matched tokens, so deeper nodes are surer.
PRIOR = (0.2, 0.65, 0.85, 0.9, 0.97)


@dataclass
class SuffixDraft:
    """Draft trees from the prompt, the output so far and `history` (earlier outputs), sized by cost.

    Each step looks up every suffix of the text of `min_pattern` to `max_pattern` tokens; for each
    one that occurred before, what followed its `max_occurrences` most recent occurrences is merged
    into a tree whose nodes count the occurrences passing through them. A node's chance of acceptance
    is estimated as p(node) = p(parent) * rate * count(node) / count(parent), where `rate` is this
    request's running rate at which the model followed a drafted continuation after a match of similar
    length (Beta `prior`, learned from each verification). Nodes are taken best first and
    `cost.best_size` cuts each tree where expected tokens per second peak; the suffix whose tree
    promises the most tokens per second is drafted (SuffixDecoding's choice over match lengths). When
    no tree beats plain decoding, as after drafts have kept failing, there is no draft: the step is
    plain decoding. Without `cost`, every node with p >= `min_prob` is drafted.
    """

    cost: VerifyCost | None = None  # measured verify cost; None: draft every node with p >= min_prob
    max_pattern: int = 16  # longest suffix matched
    min_pattern: int = 1  # shortest suffix matched
    max_depth: int = 32  # deepest draft below the last accepted token
    max_nodes: int = 64  # most draft tokens in one tree
    max_occurrences: int = 16  # recent occurrences of the matched suffix merged into the tree
    max_width: int | None = None  # most children drafted below one node, most frequent first; 1: a chain
    min_prob: float = 0.02  # nodes estimated less likely than this are never drafted
    prior: tuple[float, ...] = PRIOR  # acceptance rate per match-length bucket before this request's evidence
    prior_weight: float = 4.0  # pseudo-observations behind each prior rate
    history: SuffixIndex | None = None  # earlier outputs (shared across requests), searched after the request
    rates: dict[int, list[float]] = field(default_factory=dict, init=False)  # bucket -> [accepted, rejected] seen

    def __post_init__(self):
        for name in ("max_pattern", "min_pattern", "max_depth", "max_nodes", "max_occurrences"):
            positive_int(name, getattr(self, name))
        if self.max_width is not None:
            positive_int("max_width", self.max_width)
        if self.max_pattern < self.min_pattern:
            raise ValueError(f"max_pattern must be >= min_pattern ({self.min_pattern}), got {self.max_pattern}")
        if not 0 <= self.min_prob < 1:
            raise ValueError(f"min_prob must be in [0, 1), got {self.min_prob}")
        if len(self.prior) != _bucket(16) or not all(0 < p < 1 for p in self.prior):
            raise ValueError(f"prior must be {_bucket(16)} rates in (0, 1), one per match-length bucket, got {self.prior}")
        if self.prior_weight <= 0:
            raise ValueError(f"prior_weight must be > 0, got {self.prior_weight}")
        self.start([])

    def start(self, ids: list[int]) -> None:
        self._index = SuffixIndex(self.max_pattern)
        self._index.extend(list(ids))
        self.rates = {}
        self._pending: tuple[DraftTree, int, int] | None = None  # (tree, len(ids) when proposed, match length)
        self._matches: int | None = None

    def rate(self, match: int) -> float:
        """Estimated chance that the model follows a drafted continuation of a `match`-token match."""
        b = _bucket(match)
        acc, rej = self.rates.get(b, (0.0, 0.0))
        return (acc + self.prior_weight * self.prior[b - 1]) / (acc + rej + self.prior_weight)

    def get_candidates(self, ids: list[int]) -> DraftTree | None:
        index = self._index
        if len(ids) < len(index):
            raise ValueError("get_candidates: ids shrank since the last call; call start() first")
        self._learn(ids)
        index.extend(ids[len(index) :])
        best = None  # (expected tokens per second or, without a cost, expected tokens; tree; match length)
        for m in range(min(self.max_pattern, len(ids)), self.min_pattern - 1, -1):
            conts = index.continuations(ids[-m:], self.max_depth, self.max_occurrences)
            if self.history is not None:
                conts += self.history.continuations(ids[-m:], self.max_depth, self.max_occurrences)
            if not conts:
                continue
            tree, gains = self._best_first(conts, m)
            size = self.cost.best_size(gains) if self.cost is not None else len(gains)
            if size == 0:
                continue
            expected = 1 + sum(gains[:size])
            score = expected / self.cost(1 + size) if self.cost is not None else expected
            if best is None or score > best[0]:
                best = (score, DraftTree(tree.tokens[:size], tree.parents[:size]), m)
        if best is None:
            return None
        _, tree, m = best
        self._pending = (tree, len(ids), m)
        return tree

    def update(self, num_matches: int) -> None:
        self._matches = num_matches

    def _best_first(self, conts: list[list[int]], match: int) -> tuple[DraftTree, list[float]]:
        """The continuations of a `match`-token match merged into a counted tree, its nodes ordered best
        first, with their p; a node at depth d extends the match to match + d - 1 tokens."""
        tokens, counts, children = [], [], {}  # trie of the continuations; node -> children
        where: dict[tuple[int, int], int] = {}
        for cont in conts:  # most recent first: ties go to the most recent continuation
            cur = -1
            for tok in cont:
                node = where.get((cur, tok))
                if node is None:
                    node = where[(cur, tok)] = len(tokens)
                    tokens.append(tok)
                    counts.append(0)
                    children.setdefault(cur, []).append(node)
                counts[node] += 1
                cur = node
        for node, kids in children.items():  # most frequent first (stable: ties stay most recent first)
            children[node] = sorted(kids, key=lambda c: -counts[c])[: self.max_width]
        rates = [self.rate(match + d) for d in range(self.max_depth)]  # [d]: below a node at depth d
        heap = [(-rates[0] * counts[c] / len(conts), c, -1, 1) for c in children[-1]]
        heapq.heapify(heap)
        order, gains, parents, new = [], [], [], {-1: -1}
        while heap and len(order) < self.max_nodes:
            neg_p, node, parent, depth = heapq.heappop(heap)
            if -neg_p < self.min_prob:
                break
            new[node] = len(order)
            order.append(node)
            gains.append(-neg_p)
            parents.append(new[parent])
            for c in children.get(node, ()):
                heapq.heappush(heap, (neg_p * rates[depth] * counts[c] / counts[node], c, node, depth + 1))
        return DraftTree(tuple(tokens[n] for n in order), tuple(parents)), gains

    def _learn(self, ids: list[int]) -> None:
        """Count the last verified tree's outcome: one acceptance per accepted node, one rejection if the
        accepted branch had drafted children the model did not follow."""
        if self._pending is None or self._matches is None:
            return
        tree, at, match = self._pending
        kids, cur = tree.children(), -1
        for d, tok in enumerate(ids[at : at + self._matches]):
            cur = next(c for c in kids[cur] if tree.tokens[c] == tok)
            self._count(match + d, accepted=True)
        if cur in kids:  # drafts below the last accepted node, none followed
            self._count(match + self._matches, accepted=False)
        self._pending, self._matches = None, None

    def _count(self, match: int, accepted: bool) -> None:
        acc, rej = self.rates.get(_bucket(match), (0.0, 0.0))
        self.rates[_bucket(match)] = [acc + accepted, rej + (not accepted)]
