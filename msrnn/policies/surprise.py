"""Keep what surprised the model: a bounded state that remembers a far fact without knowing it will be asked.

Every attention-ranked policy (TOVA, H2O, SnapKV...) keeps what the *current* queries attend to, so a fact that
nothing attends to until a question long after is gone by then (docs/results/needle: 0 of 15 far needles at 256
states, for every such policy). But the model marks such a fact while reading it: it did not see it coming. With
e_j the surprise of state j's episode (the largest surprisal -log p(x_q | x_<q) among the `span` tokens up to j,
msrnn/surprise.py), `surprise` keeps

    the first `sinks` tokens                  (attention sinks, as StreamingLLM)
    the `recent` newest tokens                (the local context every next token needs; default k / 2)
    the rest of the k states by e_j           (the episodes that surprised the model most, each kept whole:
                                               its tokens share the peak that opened it)

so the memory is a window plus a handful of surprising episodes: EM-LLM's event segmentation (Fountas et al. 2024,
arXiv 2407.09450) as a bounded multi-state, without its retrieval step.
"""
from __future__ import annotations

from ..errors import InputError
from .base import INF, Policy, newest, whole


class Surprise(Policy):
    """sinks + the `recent` newest + the states of highest episode surprise (see the module)."""

    name = "surprise"
    needs_attention = False
    needs_surprise = True
    drops = False
    min_states = 2

    def __init__(self, states: int, recent: int | None = None, span: int = 16, sinks: int | None = None,
                 positions: str = "absolute"):
        super().__init__(states, positions)
        if positions == "rebase":  # a rebase renumbers the states, and surprise is matched to them by position
            raise InputError("surprise cannot use positions='rebase'; use absolute, shift or loglog.")
        self.recent = whole(self.name, "recent", recent if recent is not None else max(1, states // 2))
        self.span = whole(self.name, "span", span)
        self.sinks = whole(self.name, "sinks", sinks if sinks is not None else min(4, (states - self.recent) // 2))
        if self.recent < 1 or self.span < 1 or self.sinks < 0:
            raise InputError(f"surprise: recent={self.recent}, span={self.span} must be >= 1 and sinks={self.sinks} "
                             ">= 0.")
        if self.sinks + self.recent >= states:
            raise InputError(f"surprise: {self.sinks} sinks + {self.recent} recent states leave no room for surprising "
                             f"ones in states={states}; give fewer recent states (e.g. recent={states // 2}).")

    def priority(self, attn, pos, score, surprise):
        kept = (pos < self.sinks) | (pos > newest(pos) - self.recent)  # (B, Hkv, n) sinks and the recent window
        return surprise.masked_fill(kept, INF)  # (B, Hkv, n) the rest by e_j: the least surprising goes first

    def __repr__(self) -> str:
        return f"Surprise(states={self.states}, recent={self.recent}, span={self.span}, sinks={self.sinks})"
