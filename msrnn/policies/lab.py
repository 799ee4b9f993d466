"""The policy lab's policies (docs/results/lab/README.md): TOVA's score with memory of earlier queries (tova-decay,
tova-max), TOVA with tokens pinned (tova-sink, tova-recent), and the third round: more than the attention a state
gets (tova-value, tova-decay-head, tova-fit)."""
from __future__ import annotations

import math

import torch

from ..errors import InputError
from .base import INF, newest, per_kv_head, whole
from .paper import TOVA


# --- beyond TOVA (the policy lab, docs/results/lab): TOVA's score with memory of earlier queries ---------------------
def _gamma(name: str, gamma: float) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma < 1:
        raise InputError(f"{name}: gamma={gamma!r} must be a number in [0, 1) (0 is plain TOVA).")
    return float(gamma)


class TOVADecay(TOVA):
    """TOVA with an exponential moving average of the attention each state has received (layer-wise):

        s_j <- gamma * s_j + (1 - gamma) * a_j          a_j: the newest query's attention to state j, head-averaged
        priority_j = s_j / (1 - gamma ** age_j)         age_j: queries that have seen j (itself included)

    The division is Adam's bias correction: without it a new state, which has had one query, scores (1 - gamma)
    times less than an old one with the same attention and is dropped at once. gamma = 0 is TOVA exactly. A state
    briefly ignored keeps most of its score for about 1 / (1 - gamma) steps instead of being dropped at once."""

    name = "tova-decay"

    def __init__(self, states: int, gamma: float = 0.9, positions: str = "absolute"):
        super().__init__(states, positions)
        self.gamma = _gamma(self.name, gamma)
        # 1 - gamma**age for age = 1, 2, ... until it rounds to 1 in fp32 (a lookup is cheaper than a pow per step)
        ages = int(math.log(1e-9) / math.log(self.gamma)) + 2 if self.gamma > 0 else 1
        self.correction = 1 - self.gamma ** torch.arange(1, ages + 1, dtype=torch.float64)  # (ages,)
        self.correction = self.correction.float()

    def update(self, score, attn):
        if attn.shape[2] == 1:  # the recurrence: one new query
            return torch.lerp(attn.mean(dim=(1, 2))[:, None], score[:, :1], self.gamma)  # gamma*s + (1-gamma)*a
        s = score[:, :1]  # (B, 1, n) one score per state for the whole layer
        for a in attn.mean(dim=1).unbind(dim=1):  # a parallel prefill: each new query in order, (B, n)
            s = torch.lerp(a[:, None], s, self.gamma)
        return s

    def priority(self, attn, pos, score):
        # (B, 1, n) one score per state for the whole layer: a layer-wise policy, every kv head holds the same tokens
        return self.bias_corrected(pos[:, :1], score[:, :1])

    def bias_corrected(self, pos, score):
        """score (B, h, n) / (1 - gamma ** age), pos (B, h, n) the positions of the states those scores belong to:
        the running average, unbiased for states only a few queries saw."""
        age = (newest(pos) - pos).clamp_max_(len(self.correction) - 1)  # (B, h, n) queries that saw the state, - 1
        return score / self.correction.to(score.device).take(age)  # take: a plain lookup, cheaper than [age]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(states={self.states}, gamma={self.gamma})"


class TOVAMax(TOVADecay):
    """TOVA with a decayed maximum: s_j <- max(gamma * s_j, a_j). A state keeps the best attention it ever had,
    fading by gamma per step; gamma = 0 is TOVA exactly."""

    name = "tova-max"

    def update(self, score, attn):
        s = score[:, :1]  # (B, 1, n)
        for a in attn.mean(dim=1).unbind(dim=1):  # the T new queries in order; (B, n) each
            s = torch.maximum(self.gamma * s, a[:, None])
        return s

    def priority(self, attn, pos, score):
        return score[:, :1]


class TOVASink(TOVA):
    """TOVA that never drops the first `sinks` tokens of the stream (default 1: the first token, which the paper
    found TOVA keeps anyway, so protecting it costs nothing and makes sure)."""

    name = "tova-sink"

    def __init__(self, states: int, sinks: int = 1, positions: str = "absolute"):
        super().__init__(states, positions)
        sinks = whole(self.name, "sinks", sinks)
        if sinks < 0 or sinks >= states:
            raise InputError(f"{self.name}: {sinks} sink tokens leave no room in states={states}; give fewer sinks.")
        self.sinks = sinks

    def priority(self, attn, pos, score):
        return super().priority(attn, pos, score).masked_fill(pos[:, :1] < self.sinks, INF)


class TOVARecent(TOVA):
    """TOVA plus a recent window: the `recent` newest states always stay (default k // 8), the rest by TOVA."""

    name = "tova-recent"

    def __init__(self, states: int, recent: int | None = None, positions: str = "absolute"):
        super().__init__(states, positions)
        self.recent = states // 8 if recent is None else whole(self.name, "recent", recent)
        if not 0 <= self.recent < states:
            raise InputError(f"{self.name}: recent={self.recent} must be in [0, states={states}).")

    def priority(self, attn, pos, score):
        pos = pos[:, :1]
        return super().priority(attn, pos, score).masked_fill(pos > newest(pos) - self.recent, INF)


# --- the lab's third round (docs/results/lab/README.md, round 3): more than the attention a state gets ----------------
def value_size(value_norms: torch.Tensor) -> torch.Tensor:
    """value_norms (B, Hkv, n) -> (B, 1, n): |v_j|_1, the L1 norm of each state's value averaged over kv heads."""
    return value_norms.mean(dim=1, keepdim=True)


class TOVAValue(TOVADecay):
    """`tova-decay` weighted by the size of what a state adds to the output (VATP: Guo et al. 2024, "Attention Score
    is not All You Need for Token Importance Indicator in KV Cache Reduction: Value Also Matters"). A state enters
    the attention output as a_j v_j, so a state with a small value matters less than its attention says:

        s_j <- gamma * s_j + (1 - gamma) * a_j                    tova-decay's moving average
        priority_j = s_j / (1 - gamma ** age_j) * |v_j|_1         |v_j|_1: L1 norm of j's value, averaged over kv heads

    and, as in VATP, the first `sinks` tokens always stay: an attention sink takes much attention but has a tiny
    value (which is why it works as a sink), so the product alone would drop it, and the whole softmax would shift."""

    name = "tova-value"
    needs_value_norms = True  # |v_j|_1 per kv head, kept by the state (a value never changes while it is held)

    def __init__(self, states: int, gamma: float = 0.9, sinks: int = 1, positions: str = "absolute"):
        super().__init__(states, gamma, positions)
        sinks = whole(self.name, "sinks", sinks)
        if not 0 <= sinks < states:
            raise InputError(f"{self.name}: sinks={sinks} must be in [0, states={states}).")
        self.sinks = sinks

    def priority(self, attn, pos, score, value_norms=None):
        prio = super().priority(attn, pos, score).mul_(value_size(value_norms))  # (B, 1, n) a new tensor: in place
        return prio.masked_fill_(pos[:, :1] < self.sinks, INF)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(states={self.states}, gamma={self.gamma}, sinks={self.sinks})"


class TOVADecayHead(TOVADecay):
    """`tova-decay` per kv head (`tova-head` with memory): each kv head keeps its own k states, ranked by its own
    moving average of the attention its G query heads give them:

        s_hj <- gamma * s_hj + (1 - gamma) * mean_{i in group h} a_ij
        priority_hj = s_hj / (1 - gamma ** age_hj)

    gamma = 0 is `tova-head` exactly."""

    name = "tova-decay-head"

    def update(self, score, attn):
        for a in attn.unbind(dim=2):  # the T new queries in order; (B, H, n) each
            score = torch.lerp(per_kv_head(a, score.shape[1]).mean(dim=2), score, self.gamma)  # (B, Hkv, n)
        return score

    def priority(self, attn, pos, score):
        return self.bias_corrected(pos, score)  # (B, Hkv, n): heads hold different states


class TOVAFit(TOVAValue):
    """A tiny learned scorer: the log of what state j will add to the output of the next 32 queries,
    log(mean future attention * |v_j|_1), predicted by least squares from four features:

        priority_j = w_a log(a_j + eps) + log(s_j / (1 - gamma ** age_j) + eps) + w_v log(|v_j|_1 + eps)
                     + w_age log(age_j + 1)

    a_j: the newest query's attention (head mean); s_j: tova-decay's average (gamma 0.9); |v_j|_1 as in tova-value.
    The weights are divided by the average's (a ranking does not change under a positive scale; the intercept is
    dropped). Fitted on the full model's attention over one 1,024-token chunk of Pride and Prejudice only
    (docs/results/lab/round3_screen.py; R^2 = 0.82); the first token stays, as in tova-value."""

    name = "tova-fit"
    W_NOW, W_VALUE, W_AGE = 0.157, 1.284, 0.199  # fitted constants (see the docstring)

    def priority(self, attn, pos, score, value_norms=None):
        eps = 1e-6
        pos1 = pos[:, :1]  # (B, 1, n) layer-wise
        age = (newest(pos1) - pos1).float()  # (B, 1, n)
        prio = (self.W_NOW * (attn.mean(dim=1, keepdim=True) + eps).log() + (self.bias_corrected(pos1, score[:, :1])
                + eps).log() + self.W_VALUE * (value_size(value_norms) + eps).log() + self.W_AGE * age.log1p())  # (B, 1, n)
        return prio.masked_fill(pos1 < self.sinks, INF)
