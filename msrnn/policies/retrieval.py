"""Memory beyond recency: retrieval heads and streaming heads, each kv head with its own budget.

A policy that evicts alike in every head (TOVA, H2O, sinks) keeps what is *recent*: asked at 2,048 tokens for a
number read 1,500 tokens back, every such policy at 256 states per layer loses it (docs/results/needle). But few
heads fetch from far back; the rest read the first tokens and the recent ones (DuoAttention, Xiao et al. 2024,
arXiv 2410.10819; RazorAttention, Tang et al. 2024). Give the few a large share of the same memory:

    N kv heads, mean budget k (what the user pays: the bytes of k states in every head)
    streaming head:  s   = k * stream                     sinks + the most recent states (StreamingLLM)
    retrieval head:  k_r = (N k - (N - R) s) / R          the rest, shared by the R heads ranked first
    R                = floor(N (k - s) / (ratio k - s))   so that k_r >= ratio * k  (ratio 8: at 1/8 of a stream,
                                                          a retrieval head holds all of it)

which heads retrieve is measured once per model by `msrnn calibrate` (msrnn/calibrate.py) and read from its
file; the bundled SmolLM2's calibration ships in msrnn/calibrations/. A retrieval head that must still evict
(a stream longer than k_r) ranks its states as tova-head does, by the attention of its own query heads, and keeps
the first `sinks` tokens (or, sink_free, drops them first).

What it did on the bundled 135M model (docs/results/needle/memory-2048): no better than TOVA at keeping a far fact
at 1/8 (0 of 15 needles from the first half of 2,048 tokens) and 14 % worse in PPL; the probes there say why (a
third of the heads must be whole at the question, and streaming heads that read the prompt break even those).
`tova-outliers`, below, is the one candidate that beat TOVA, in PPL only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import InputError
from .base import INF, Policy, per_kv_head, whole
from .kvpress import outlying

BUNDLED = Path(__file__).resolve().parent.parent / "calibrations" / "smollm2-135m-instruct.json"


def read_calibration(path: str | Path | None = None) -> dict:
    """A calibration file of `msrnn calibrate` (None: the bundled model's): its `ranking`, [[layer, head], ...]
    most needed first, and `layers`, `kv_heads`."""
    path = Path(path) if path is not None else BUNDLED
    if not path.is_file():
        raise InputError(f"calibration file {path} does not exist; make one with `msrnn calibrate --model ... "
                         "--out DIR` and give retrieval(calibration='DIR/calibration.json').")
    try:
        cal = json.loads(path.read_text())
        layers, heads, ranking = int(cal["layers"]), int(cal["kv_heads"]), [tuple(map(int, x)) for x in cal["ranking"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path} is not a msrnn calibration file ({type(e).__name__}: {e}).") from None
    if sorted(ranking) != [(i, h) for i in range(layers) for h in range(heads)]:
        raise InputError(f"{path}: its ranking must name every (layer, kv head) of {layers} x {heads} once.")
    return {**cal, "ranking": ranking, "layers": layers, "kv_heads": heads, "path": str(path)}


def head_budgets(ranking, layers: int, kv_heads: int, k: int, ratio: float, stream: float, sinks: int,
                 heads: int | None = None):
    """([[k_00, k_01, ...], ...], the R retrieval heads [(layer, head), ...]): the R heads ranked first get k_r,
    the others s, the budgets summing to N k (see the module). heads: R itself, instead of the ratio's."""
    N = layers * kv_heads
    s = max(round(k * stream), sinks + 1)
    if s > k:
        raise InputError(f"retrieval: states={k} leaves no room for {sinks} sinks and a recent window in the "
                         f"streaming heads; give states > {sinks + 1}.")
    R = max(1, min(N, math.floor(N * (k - s) / (ratio * k - s)) if ratio * k > s else N))
    if heads is not None:
        if isinstance(heads, bool) or not isinstance(heads, int) or not 1 <= heads <= N:
            raise InputError(f"retrieval: heads={heads!r} must be a whole number of kv heads in 1..{N}.")
        R = heads
    total = N * k - (N - R) * s  # what the retrieval heads share
    budgets = [[s] * kv_heads for _ in range(layers)]
    for j, (i, h) in enumerate(ranking[:R]):
        budgets[i][h] = total // R + (1 if j < total % R else 0)  # whole states, the same total
    return budgets, ranking[:R]


class HeadMix(Policy):
    """One layer's heads, each its own budget: `retrieval` heads rank by their own query heads' attention (tova-head)
    and the others keep the most recent states; both keep the first `sinks` tokens, unless sink_free: then a
    retrieval head drops them first (-inf) once it is over budget, so that a question's attention has no sink to
    fall into there (docs/results/needle/memory-2048: with the needle kept, a sink in every head cost every answer)."""

    name = "retrieval"
    drops = False

    def __init__(self, budgets, retrieval, sinks: int = 4, positions: str = "absolute", sink_free: bool = False):
        super().__init__(min(budgets), positions)
        self.heads, self.states, self.sinks, self.sink_free = tuple(budgets), max(budgets), sinks, sink_free
        self._retrieval = torch.tensor(retrieval, dtype=torch.bool)[None, :, None]  # (1, Hkv, 1)
        self.drops = sink_free and any(retrieval)

    def priority(self, attn, pos, score):
        retrieval = self._retrieval.to(pos.device)
        attention = per_kv_head(attn, pos.shape[1]).mean(dim=2)  # (B, Hkv, n) tova-head: each head's own queries
        recency = pos.to(attention.dtype)  # (B, Hkv, n) newer = higher
        prio = torch.where(retrieval, attention, recency)
        sink = (pos >= 0) & (pos < self.sinks)  # (B, Hkv, n)
        if self.sink_free:
            prio = prio.masked_fill(sink & retrieval, -INF)
            sink = sink & ~retrieval
        return prio.masked_fill(sink, INF)  # (B, Hkv, n)

    def __repr__(self) -> str:
        return f"HeadMix(heads={list(self.heads)}, retrieval={self._retrieval.flatten().tolist()})"


class Retrieval(Policy):
    """Retrieval heads get a large share of the memory, the other heads sinks + recent states (see the module):
    `states` is the mean budget per kv head. calibration: a file of `msrnn calibrate` (default: the bundled
    SmolLM2's); ratio: a retrieval head's budget in units of k; stream: a streaming head's budget in units of k;
    heads: the number of retrieval heads instead of the ratio's; sink_free: retrieval heads drop the sinks."""

    name = "retrieval"
    drops = False
    min_states = 2

    def __init__(self, states: int, calibration: str | None = None, ratio: float = 8, stream: float = 0.25,
                 sinks: int = 4, heads: int | None = None, sink_free: bool = False, positions: str = "absolute"):
        super().__init__(states, positions)
        for key, value, low in (("ratio", ratio, 1), ("stream", stream, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low or \
                    (key == "stream" and value >= 1):
                raise InputError(f"retrieval: {key}={value!r} must be a number {'> 1' if key == 'ratio' else 'in (0, 1)'}.")
        self.sinks = whole(self.name, "sinks", sinks)
        self.cal, self.ratio, self.stream = read_calibration(calibration), float(ratio), float(stream)
        self.budgets, self.retrieval = head_budgets(self.cal["ranking"], self.cal["layers"], self.cal["kv_heads"],
                                                    states, self.ratio, self.stream, self.sinks, heads)
        self.sink_free = bool(sink_free)
        self.members = [HeadMix(b, [(i, h) in self.retrieval for h in range(len(b))], self.sinks, positions,
                                self.sink_free) for i, b in enumerate(self.budgets)]
        self.drops = any(m.drops for m in self.members)

    def at_layer(self, layer, layers):
        if layers != len(self.members):
            raise InputError(f"retrieval: the calibration {self.cal['path']} is of a model of {len(self.members)} "
                             f"layers, not {layers}; calibrate this model (msrnn calibrate) and give "
                             "retrieval(calibration='...json').")
        return self.members[layer]

    def min_budget(self) -> int:
        return min(map(min, self.budgets))

    def budget(self):
        raise InputError("a retrieval policy has budgets per layer and kv head; bind a layer with at_layer.")

    def priority(self, attn, pos, score):
        raise InputError("a retrieval policy decides per layer; bind a layer with at_layer(layer, layers).")

    def __repr__(self) -> str:
        return (f"Retrieval(states={self.states}, ratio={self.ratio}, stream={self.stream}, sinks={self.sinks}, "
                f"heads={len(self.retrieval)}, sink_free={self.sink_free})")


class TOVAOutliers(Policy):
    """TOVA with a reserve for outliers: per kv head, the `share` of the budget whose keys stand furthest from the
    rest (KeyDiff's score) always stays, and TOVA ranks the others by the attention of that head's own queries:

        outlier_j  = -cos(k_j, mean_i k_i / |k_i|)                 KeyDiff (msrnn/policies/kvpress.py)
        priority_j = +inf  if j is among the share * k most outlying states of its kv head
                     mean over the head's query heads of a_j    otherwise (tova-head)

    The idea: a fact unlike its surroundings (a number in prose) has a key unlike theirs, so it may survive the
    recency that attention alone favours, before anyone asks for it."""

    name = "tova-outliers"
    needs_keys = True
    drops = False
    min_states = 2

    def __init__(self, states: int, share: float = 0.25, positions: str = "absolute"):
        super().__init__(states, positions)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
            raise InputError(f"{self.name}: share={share!r} must be a number in (0, 1).")
        self.share, self.reserve = float(share), max(1, min(states - 1, round(states * share)))

    def priority(self, attn, pos, score, keys=None):
        score_out = outlying(keys, pos).masked_fill(pos == -1, -INF)  # (B, Hkv, n) KeyDiff's
        # the most outlying r, the newest of equals: equal keys tie exactly (a repeated token's raw key when the
        # scheme rotates at use), and slot order differs between stepping and the layer-major scan
        newest = pos.argsort(dim=-1, descending=True, stable=True)  # (B, Hkv, n) slots, newest first
        ranked = score_out.gather(-1, newest).argsort(dim=-1, descending=True, stable=True)  # ties keep that order
        top = newest.gather(-1, ranked[..., : min(self.reserve, pos.shape[-1])])  # (B, Hkv, r)
        attention = per_kv_head(attn, pos.shape[1]).mean(dim=2)  # (B, Hkv, n) tova-head
        return attention.scatter(-1, top, INF)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(states={self.states}, share={self.share})"
