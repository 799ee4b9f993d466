"""Policies: what turns the unbounded multi-state into a bounded one.

After the new token has attended to all n+1 states of a layer, the model asks the layer's policy which states to keep
when there are more than `states` (k) of them. A policy answers with a *priority* per state: the model keeps the k
states of highest priority (of equal priorities the oldest goes first) and drops every state whose priority is -inf.
Constant +inf marks a state that must stay (attention sinks, a recent window).

What a policy sees (plain tensors; no model needed in a unit test):
    attn   (B, H, n)    fp32 attention probabilities of the newest query, per query head (sums to 1 over n)
    pos    (B, Hkv, n)  int64 absolute position of each state (-1 = empty slot), per kv head
    score  (B, Hkv, n)  fp32 the running score this policy keeps in the state (see `update`)
and returns priority (B, 1, n) for a layer-wise decision or (B, Hkv, n) for one per kv head. Query head h reads kv
head h // G with G = H / Hkv, so `attn.view(B, Hkv, G, n)` groups a kv head's query heads.

A policy that keeps a running score (H2O) overrides `update(score, attn)`, called once per forward call with the
probabilities of all T new queries, attn (B, H, T, n); T is 1 in the recurrence and larger only in a parallel prefill.

A policy that sets `needs_values = True` is also given the states' values, `priority(attn, pos, score, values=...)`
with values (B, Hkv, n, hd) (a view of the state: read, never write); one that sets `needs_value_norms = True` is
given value_norms=(B, Hkv, n), the L1 norm of each state's value per kv head, which the state computes once when a
state enters instead of at every step (tova-value). Every other policy is called with the three arguments above, so
a policy written for them keeps working.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import math
from pathlib import Path

import torch

from .errors import InputError

INF = float("inf")


class Policy:
    """Base class. Subclasses set `name` and implement `priority` (and `update` if they keep a score)."""

    name = "policy"
    needs_attention = True  # False: priority ignores `attn` (window, sinks...); it is then given None
    layer_local = True  # decides from its own layer's tensors only, so a chunk can run layer-major (attention.scan)
    min_states = 1  # the smallest budget that makes sense for this policy
    keeps_score = False  # set for every class that overrides `update`
    drops = True  # priority may be -inf ("drop now"); False lets the model skip that check (built-ins that never do)
    needs_values = False  # True: priority is also given values=(B, Hkv, n, hd), the states' values
    needs_value_norms = False  # True: priority is also given value_norms=(B, Hkv, n), |v_j|_1 per kv head
    needs_keys = False  # True: priority also takes keys=(B, Hkv, n, hd), the keys the layer holds (KeyDiff)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.keeps_score = cls.update is not Policy.update

    def __init__(self, states: int, positions: str = "absolute"):
        if isinstance(states, bool) or not isinstance(states, int) or states < self.min_states:
            raise InputError(f"{self.name}: states={states!r} is not a valid budget; give an integer >= {self.min_states}.")
        if positions not in POSITION_SCHEMES:
            raise InputError(f"positions={positions!r} is unknown; choose one of {', '.join(POSITION_SCHEMES)}.")
        self.states = states  # k: the most states a layer keeps after each step
        self.positions = positions

    def budget(self):
        """k, the most states a row may keep: an int, or (B, 1, 1) when rows have budgets of their own."""
        return self.states

    def min_budget(self) -> int:
        """The smallest budget of any row: a layer holding no more cannot have to evict."""
        return self.states

    def at_layer(self, layer: int, layers: int) -> "Policy":
        """The policy that bounds layer `layer` (0 = the one next to the embeddings) of a model of `layers` layers.
        One budget for every layer: the policy itself. A per-layer policy (`PerLayer`, `PyramidKV`) answers with a
        policy of that layer's budget; the model binds each layer once per call, so nothing else sees a list."""
        return self

    def update(self, score: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return score

    def priority(self, attn: torch.Tensor, pos: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(states={self.states})"


def check_priority(policy: Policy, prio, pos: torch.Tensor, nan: bool = False):
    """prio as `policy` returned it, if it has the contract's shape (B, 1 or Hkv, n) and a float dtype (and, with
    nan=True, no NaN); otherwise one InputError that names the policy."""
    B, Hkv, n = pos.shape
    if not isinstance(prio, torch.Tensor) or not prio.is_floating_point() or prio.dim() != 3 or \
            prio.shape[0] != B or prio.shape[1] not in (1, Hkv) or prio.shape[2] != n:
        got = f"{prio.dtype} {tuple(prio.shape)}" if isinstance(prio, torch.Tensor) else type(prio).__name__
        raise InputError(f"policy {policy.name!r} ({type(policy).__name__}.priority) returned {got}; a priority is a "
                         f"float tensor of shape (B, 1, n) or (B, Hkv, n), here ({B}, 1 or {Hkv}, {n}) "
                         "(docs/policies.md).")
    if nan and bool(prio.isnan().any()):
        raise nan_error(policy, int(prio.isnan().flatten(1).any(1).nonzero()[0]))
    return prio


def check_score(policy: Policy, new, score: torch.Tensor):
    """new, as `policy.update` returned it, if it has the contract's shape (B, 1 or Hkv, n) for a score (B, Hkv, n)
    and a float dtype (a tensor of another shape would broadcast into the state's scores unnoticed); otherwise one
    InputError that names the policy. Shapes and dtypes only: no host sync."""
    B, Hkv, n = score.shape
    if not isinstance(new, torch.Tensor) or not new.is_floating_point() or new.dim() != 3 or \
            new.shape[0] != B or new.shape[1] not in (1, Hkv) or new.shape[2] != n:
        got = f"{new.dtype} {tuple(new.shape)}" if isinstance(new, torch.Tensor) else type(new).__name__
        raise InputError(f"policy {policy.name!r} ({type(policy).__name__}.update) returned {got}; a score is a float "
                         f"tensor of shape (B, 1, n) or (B, Hkv, n), as the score it is given, here ({B}, 1 or {Hkv}, "
                         f"{n}) (docs/policies.md).")
    return new


def check_policy(policy) -> None:
    """A policy the model can bind: None (unbounded) or a Policy whose __init__ ran Policy.__init__ (which sets its
    budget and position scheme); one InputError otherwise."""
    if policy is None:
        return
    if not isinstance(policy, Policy):
        raise InputError(f"policy must be a msrnn.policies.Policy (or None for unbounded), got "
                         f"{type(policy).__name__}; build one with msrnn.policies.make_policy(name, states).")
    if not hasattr(policy, "states") or not hasattr(policy, "positions"):
        cls = type(policy).__name__
        raise InputError(f"{cls}.__init__ did not call super().__init__(states, positions), so the policy has no "
                         f"budget; call it first in {cls}.__init__ (docs/policies.md).")


def nan_error(policy: Policy, row: int) -> InputError:
    """The error for NaN priorities in batch row `row` (a NaN cannot be ranked), naming the policy of that row."""
    for member, first, end in getattr(policy, "blocks", ()):  # rows of several policies: name the culprit
        if first <= row < end:
            policy = member
    return InputError(f"policy {policy.name!r} ({type(policy).__name__}.priority) returned NaN priorities; "
                      "a NaN cannot be ranked (look for 0/0 or log(0) in the policy).")


# What the model asks of a policy, and how a policy made of several (PerLayer: one per layer; RowPolicies: one per
# block of rows) answers for its members: it needs something if any member does, is layer-local if all are.
CONTRACT_FLAGS = (("needs_attention", any), ("keeps_score", any), ("drops", any), ("needs_keys", any),
                  ("needs_values", any), ("needs_value_norms", any), ("layer_local", all))


def take_flags(policy: Policy, members) -> None:
    """Set policy's contract flags (CONTRACT_FLAGS) from its members'."""
    for flag, combine in CONTRACT_FLAGS:
        setattr(policy, flag, combine(getattr(m, flag) for m in members))


def per_kv_head(attn: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, ...) -> (B, Hkv, G, ...): each kv head's group of query heads."""
    return attn.view(attn.shape[0], kv_heads, -1, *attn.shape[2:])


def newest(pos: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, 1) the position of the newest state of each row (it is always present when the policy runs)."""
    return pos.amax(dim=-1, keepdim=True)


class Window(Policy):
    """Keep the k most recent states (FIFO). The new token attends to k + 1 tokens: Mistral's sliding_window = k+1."""

    name = "window"
    drops = False
    needs_attention = False

    def priority(self, attn, pos, score):
        return pos.float()  # newer = higher


def _whole(name: str, key: str, value) -> int:
    """A policy setting that counts tokens: 2.5 sinks is a mistake, not 2."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name}: {key}={value!r} must be a whole number of tokens.")
    return value


class Sinks(Policy):
    """StreamingLLM's Window+i: the first `sinks` tokens of the stream are kept forever, plus the k - i most recent."""

    name = "sinks"
    drops = False
    needs_attention = False

    def __init__(self, states: int, sinks: int = 4, positions: str = "absolute"):
        super().__init__(states, positions)
        sinks = _whole(self.name, "sinks", sinks)
        if sinks < 0 or sinks >= states:
            raise InputError(f"sinks: {sinks} sink tokens leave no room for a window in states={states}; "
                             f"give states > sinks (e.g. states={sinks + 60}) or fewer sinks.")
        self.sinks = sinks

    def priority(self, attn, pos, score):
        return pos.float().masked_fill(pos < self.sinks, INF)


class TOVA(Policy):
    """TOVA (layer-wise): drop the state the newest query attends to least, averaged over all the layer's heads."""

    name = "tova"
    drops = False

    def priority(self, attn, pos, score):
        return attn.mean(dim=1, keepdim=True)  # (B, 1, n) one decision for the whole layer


class TOVAHead(Policy):
    """TOVA per kv head: each kv head drops the state its own query heads attend to least."""

    name = "tova-head"
    drops = False

    def priority(self, attn, pos, score):
        return per_kv_head(attn, pos.shape[1]).mean(dim=2)  # (B, Hkv, n)


class H2O(Policy):
    """H2O (head-wise): keep the heavy hitters, the states with most attention *accumulated* over all past queries,
    and always the k // 2 most recent states."""

    name = "h2o"
    drops = False
    min_states = 2

    def __init__(self, states: int, positions: str = "absolute"):
        super().__init__(states, positions)
        self.recent = states // 2

    def update(self, score, attn):
        # score (B, Hkv, n) += attention each state received from the T new queries, summed over the group's heads
        return score + per_kv_head(attn, score.shape[1]).sum(dim=(2, 3))

    def priority(self, attn, pos, score):
        return score.masked_fill(pos > newest(pos) - self.recent, INF)


class H2OLayer(H2O):
    """H2O with one decision per layer: attention accumulated over all heads of the layer."""

    name = "h2o-layer"

    def update(self, score, attn):
        return score + attn.sum(dim=(1, 2))[:, None, :]  # (B, 1, n) broadcast: every kv head keeps the same states


class Baseline(Policy):
    """The paper's chunked baseline: independent chunks of k + 1 tokens. When the state exceeds k, everything is
    dropped, so the next token starts a fresh context. (k + 1, not k, so that a token attends to at most k + 1
    tokens, like every other policy with budget k.)"""

    name = "baseline"
    needs_attention = False

    def priority(self, attn, pos, score):
        return torch.full_like(pos, -INF, dtype=torch.float32)


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
        sinks = _whole(self.name, "sinks", sinks)
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
        self.recent = states // 8 if recent is None else _whole(self.name, "recent", recent)
        if not 0 <= self.recent < states:
            raise InputError(f"{self.name}: recent={self.recent} must be in [0, states={states}).")

    def priority(self, attn, pos, score):
        pos = pos[:, :1]
        return super().priority(attn, pos, score).masked_fill(pos > newest(pos) - self.recent, INF)


# --- kvpress's field: policies from later papers, in the same contract ----------------------------------------------
class SnapKV(Policy):
    """SnapKV (Li et al. 2024, arXiv 2404.14469): a prompt is compressed once, by the votes of its last w queries
    (the observation window), smoothed over neighbouring positions, per kv head:

        C_j = sum_{i in window} sum_{h in group} A_{h,i,j}                       votes of state j (a prefix state)
        P_j = (1 / s) sum_{|d| <= s // 2} C_{j+d}                               avg-pooled over s neighbours (0 past the ends)
        keep  the w states of the window  +  the k - w prefix states of highest P_j

    (A: attention probabilities; the official code's defaults w = 32, s = 5, avgpool.) It is a fast-prefill
    policy: with `prefill="fast"` (one parallel pass over the prompt, then one eviction) this is SnapKV exactly.
    SnapKV itself never evicts after the prompt; a msrnn policy keeps at most k after every step, so each later
    query adds its vote to C (as H2O accumulates) and the newest w states stay. With `prefill="exact"` every
    token is its own observation window, which makes it H2O with pooled scores and a protected window. (`msrnn eval
    ppl --prefill fast` builds its prompt state by the recurrence, so there too every prompt query votes: the
    window-only vote is `model.prefill(mode="fast")` and `PolicyCache(policy, prefill="fast")`.)"""

    name = "snapkv"
    needs_attention = False  # priority reads the votes kept in `score`, not the newest query's attention
    layer_local = False  # `update` depends on how queries are grouped (only a call's last w vote): stepped token
    # by token in an exact prefill, so that there every query votes, as when stepping
    drops = False
    min_states = 2

    def __init__(self, states: int, window: int | None = None, kernel: int = 5, positions: str = "absolute"):
        super().__init__(states, positions)
        self.window = min(32, states // 2) if window is None else window
        if isinstance(self.window, bool) or not isinstance(self.window, int) or not 0 < self.window < states:
            raise InputError(f"{self.name}: window={self.window!r} must be an integer in 1..{states - 1} (the "
                             "observation window is kept and the rest of the budget chosen by its votes).")
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise InputError(f"{self.name}: kernel={kernel!r} must be a positive odd integer (pooling keeps length).")
        self.kernel = kernel

    def update(self, score, attn):
        # the last w of the T new queries vote: (B, H, w, n) -> summed over each kv head's group and the queries
        return score + per_kv_head(attn[:, :, -self.window :], score.shape[1]).sum(dim=(2, 3))

    def priority(self, attn, pos, score):
        window = pos > newest(pos) - self.window  # (B, Hkv, n) the newest w states
        order = pos.argsort(dim=-1)  # pooling runs over neighbours in position order (slots are in no order)
        votes = score.masked_fill(window | (pos == -1), 0.0).gather(-1, order)  # (B, Hkv, n) prefix votes, in order
        B, Hkv, n = votes.shape
        pooled = torch.nn.functional.avg_pool1d(votes.reshape(B * Hkv, 1, n), self.kernel, stride=1,
                                                padding=self.kernel // 2).view(B, Hkv, n)
        return torch.empty_like(pooled).scatter_(-1, order, pooled).masked_fill(window, INF)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(states={self.states}, window={self.window}, kernel={self.kernel})"


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
        sinks = _whole(self.name, "sinks", sinks)
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


POSITION_SCHEMES = ("absolute", "shift", "loglog", "rebase")  # see msrnn/rope.py
FULL = "full"  # the unbounded transformer: no policy at all (None)
POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (Window, Sinks, TOVA, TOVAHead, H2O, H2OLayer, Baseline,
                        TOVADecay, TOVAMax, TOVASink, TOVARecent, SnapKV, TOVAValue,
                        TOVADecayHead, TOVAFit)
}


def policy_class(name: str) -> type[Policy] | None:
    """A built-in policy by its CLI name, or your own class as "path/to/file.py:ClassName" (a Policy subclass);
    None for `full`, the unbounded transformer, which has no policy."""
    if name == FULL:
        return None
    if name in POLICIES:
        return POLICIES[name]
    path, colon, cls_name = name.rpartition(":")
    if not colon or not path.endswith(".py"):
        close = difflib.get_close_matches(name, [FULL, *POLICIES], n=1)
        raise InputError(f"unknown policy {name!r}{f': did you mean {close[0]}?' if close else ''}; choose one of "
                         f"{FULL}, {', '.join(POLICIES)}, or give your own as path/to/file.py:ClassName.")
    return _load_policy_file(Path(path), cls_name)


def _load_policy_file(path: Path, cls_name: str) -> type[Policy]:
    if not path.is_file():
        raise InputError(f"policy file {path} does not exist; give path/to/file.py:ClassName.")
    spec = importlib.util.spec_from_file_location(f"msrnn_user_policy_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # the user's code: report where, not a traceback (or a silent exit)
        raise InputError(f"policy file {path} failed to run: {type(e).__name__}: {e}") from e
    found = [n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, Policy) and v is not Policy
             and v.__module__ == module.__name__]
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise InputError(f"policy file {path} has no {cls_name!r}; the Policy classes it defines: "
                         f"{', '.join(found) or 'none'}.")
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise InputError(f"{path}:{cls_name} is not a msrnn.policies.Policy subclass; subclass Policy and "
                         "implement priority(attn, pos, score) (see docs/policies.md).")
    return cls


def parse_spec(spec: str) -> tuple[str, dict]:
    """ "tova-decay(gamma=0.8)" -> ("tova-decay", {"gamma": 0.8}): a policy's settings written in its CLI name."""
    name, paren, args = spec.strip().partition("(")
    if not paren:
        return name, {}
    if not args.endswith(")"):
        raise InputError(f"policy {spec!r}: settings go in parentheses, e.g. tova-decay(gamma=0.8).")
    kwargs = {}
    for item in filter(None, (a.strip() for a in args[:-1].split(","))):
        key, eq, value = item.partition("=")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip()) if eq else None
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = None
        if not eq or kwargs[key.strip()] is None or not key.strip().isidentifier():
            raise InputError(f"policy {spec!r}: {item!r} is not key=value with a number, e.g. gamma=0.8.")
    return name.strip(), kwargs


def make_policy(name: str, states: int | None = None, positions: str | None = None, **kwargs) -> Policy | None:
    """The policy called `name` (as the CLI spells it, settings allowed: "tova-decay(gamma=0.8)") with budget
    `states` and position scheme `positions` (None: the policy's own default); `full` gives None (unbounded).
    `states` as a list gives every layer its own budget (layer 0 first): a PerLayer of one such policy per layer."""
    if positions is not None:
        kwargs["positions"] = positions
    spec, (name, settings) = name, parse_spec(name)
    cls = policy_class(name)
    if cls is None:  # full
        return None
    if states is None:
        raise InputError(f"policy {name!r} needs a budget: give states=k (e.g. --states 256).")
    if isinstance(states, (list, tuple)):  # one budget per layer: one policy per layer
        return PerLayer([make_policy(spec, _layer_budget(name, k), None, **kwargs) for k in states])
    unknown_setting(name, cls, settings)
    try:
        return cls(states, **settings, **kwargs)
    except TypeError as e:  # a setting the class does not take
        raise InputError(f"policy {name!r} does not take the settings {settings or kwargs}: {e}") from None


def unknown_setting(name: str, cls: type[Policy], settings: dict) -> None:
    """One InputError for the first setting `cls.__init__` does not take, with the closest one it does (a class
    taking **kwargs is left to itself)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    known = [p for p in params if p not in ("self", "states", "positions")]
    for key in settings:
        if key not in params or key in ("self", "states", "positions"):
            close = difflib.get_close_matches(key, known, n=1)
            listed = f"ts settings: {', '.join(known)}" if known else "t has no settings"
            hint = f": did you mean {close[0]}? I{listed}" if close else f"; i{listed}"
            raise InputError(f"policy {name!r} does not take a setting {key!r}{hint} (the budget is --states, the "
                             "position scheme --positions).")


# --- budgets per layer (PyramidKV), and a key-based press (KeyDiff) --------------------------------------------------
def _layer_budget(name: str, k) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputError(f"policy {name!r}: a per-layer budget list holds whole numbers of states, got {k!r}.")
    return k


class PerLayer(Policy):
    """One policy per layer, each with its own budget: `states` is the list [k_0, k_1, ...], layer 0 first.

        make_policy("tova", [96, 64, 32])      # a 3-layer model: layer 0 keeps 96 states, layer 2 keeps 32

    The model asks `at_layer(i, layers)` for layer i's policy (members[i]) before the layer runs, so attention,
    eviction and the state's buffers only ever see one integer budget; a list of another length than the model's
    layers is refused there, with one error."""

    name = "per-layer"

    def __init__(self, members):
        members = list(members)
        if not members or not all(isinstance(m, Policy) and not isinstance(m, PerLayer) for m in members):
            raise InputError("PerLayer takes a non-empty list of policies, one per layer (layer 0 first).")
        for m in members:
            check_policy(m)
        if len({m.positions for m in members}) != 1:
            raise InputError("PerLayer: every layer's policy needs the same position scheme.")
        self.members, self.positions = members, members[0].positions
        self.states = [m.states for m in members]  # the budgets, layer 0 first (a label: the model binds members)
        self.name = members[0].name if len({m.name for m in members}) == 1 else "per-layer"
        take_flags(self, members)
        self.min_states = min(m.min_states for m in members)

    def at_layer(self, layer, layers):
        if layers != len(self.members):
            raise InputError(f"policy {self.name!r}: {len(self.members)} per-layer budgets for a model of {layers} "
                             f"layers; give exactly {layers} budgets, one per layer (layer 0 first), e.g. "
                             f"--states \"[{','.join(['256'] * min(layers, 3))}{',...' if layers > 3 else ''}]\".")
        return self.members[layer]

    def budget(self):
        raise InputError("a PerLayer policy has one budget per layer; bind a layer with at_layer(layer, layers).")

    def min_budget(self) -> int:
        return min(self.states)

    def priority(self, attn, pos, score, keys=None):
        raise InputError("a PerLayer policy decides per layer; bind a layer with at_layer(layer, layers).")

    def __repr__(self) -> str:
        return f"PerLayer({self.members!r})"


def layer_budgets(policy: Policy | None, layers: int) -> list[int | None]:
    """The budget of each of the `layers` layers under `policy` (None: unbounded)."""
    if policy is None:
        return [None] * layers
    return [policy.at_layer(i, layers).states for i in range(layers)]


def pyramid(states: int, layers: int, window: int, beta: float) -> list[int]:
    """PyramidKV's budgets: an arithmetic sequence from the bottom layer down to the top one, beside a kept window
    of w states, whose total is that of `states` in every layer (see PyramidKV). Returns [k_0, ..., k_{L-1}]."""
    from fractions import Fraction

    if layers == 1:  # a pyramid of one layer is the uniform budget
        return [states]
    r = Fraction(states - window)  # the part of the mean budget chosen by votes
    top = max(r / Fraction(beta), Fraction(1))  # at least one voted state in every layer
    bottom = 2 * r - top
    step = (bottom - top) / (layers - 1)
    exact = [window + bottom - i * step for i in range(layers)]  # sums to layers * states exactly
    # whole numbers with the same total: each budget is a difference of rounded running sums (within 1 of exact)
    ends = [math.floor(sum(exact[: i + 1]) + Fraction(1, 2)) for i in range(layers)]
    return [e - s for e, s in zip(ends, [0, *ends[:-1]])]


class PyramidKV(SnapKV):
    """PyramidKV (Cai et al. 2024, arXiv 2406.02069, "Pyramidal Information Funneling"): SnapKV's selection with a
    budget per layer, large in the lower layers, where attention is spread wide, and small in the upper ones, where
    it funnels onto a few tokens. With k the mean budget (`states`), L layers, w the kept observation window and
    beta the pyramid's steepness (the official code's default 20):

        r       = k - w                                      the mean budget chosen by votes
        k_top   = w + max(r / beta, 1)                        layer L-1
        k_bot   = w + 2 r - (k_top - w)                       layer 0
        k_l     = k_bot - l (k_bot - k_top) / (L - 1)         an arithmetic sequence, so  sum_l k_l = L k

    Budgets are made whole numbers with the same total (differences of rounded running sums: each within 1 of
    k_l). The official code also flattens the pyramid for prompts shorter than the budget; a msrnn budget holds for
    the whole stream, so the pyramid is fixed. Every layer then runs SnapKV with its own k_l (`at_layer`)."""

    name = "pyramidkv"

    def __init__(self, states: int, beta: float = 20, window: int | None = None, kernel: int = 5,
                 positions: str = "absolute"):
        super().__init__(states, window, kernel, positions)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 1:
            raise InputError(f"{self.name}: beta={beta!r} must be a number >= 1 (1: the same budget in every layer; "
                             "the paper's code uses 20).")
        self.beta = beta
        self._layers: dict[int, list[SnapKV]] = {}  # layers -> the bound SnapKV of each layer

    def budgets(self, layers: int) -> list[int]:
        """[k_0, ..., k_{L-1}] for a model of `layers` layers (they sum to layers * states)."""
        return pyramid(self.states, layers, self.window, self.beta)

    def at_layer(self, layer, layers):
        if layers not in self._layers:
            self._layers[layers] = [SnapKV(k, self.window, self.kernel, self.positions) for k in self.budgets(layers)]
        return self._layers[layers][layer]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(states={self.states}, beta={self.beta}, window={self.window}, "
                f"kernel={self.kernel})")


class KeyDiff(Policy):
    """KeyDiff (Park et al. 2025, arXiv 2504.15364; kvpress's KeyDiffPress): keep the states whose keys differ most
    from the others, per kv head, with no attention at all:

        a          = (1 / n) sum_j k_j / ||k_j||           the anchor: the mean direction of the n keys held
        priority_j = -cos(k_j, a) = -(k_j . a) / (||k_j|| ||a||)

    so the state whose key points most like the average goes first. A key that points elsewhere is one a future
    query can single out; keys alike are interchangeable, so attention spread over them loses little when one
    goes. It reads keys, not attention (`needs_keys`), which keeps a model's fused attention kernel fast in
    msrnn.hf. (KeyDiff's paper evicts block by block while reading a prompt; here, as every msrnn policy, one
    state per step: the same score, applied at every step.)"""

    name = "keydiff"
    needs_attention = False
    needs_keys = True
    drops = False
    min_states = 2  # k = 1 ranks 2 candidates, whose cosines to their mean are always equal: a tie rounding decides

    def priority(self, attn, pos, score, keys=None):
        # (B, Hkv, n, hd) in fp64: the average runs over the held slots in slot order, which differs between the
        # layer-major scan and the token-by-token recurrence; fp32 rounding could then flip a near-tie between them
        keys = keys.double()
        held = (pos != -1)[..., None]  # (B, Hkv, n, 1) an empty slot is not part of the average
        unit = torch.nn.functional.normalize(keys, dim=-1) * held  # (B, Hkv, n, hd)
        anchor = unit.sum(dim=2, keepdim=True) / held.sum(dim=2, keepdim=True).clamp(min=1)  # (B, Hkv, 1, hd)
        return -torch.nn.functional.cosine_similarity(keys, anchor, dim=-1).float()  # (B, Hkv, n)


POLICIES.update({p.name: p for p in (PyramidKV, KeyDiff)})


def parse_states(text: str) -> int | list[int]:
    """--states as typed: "256" (every layer) or "[96,64,32]" (one budget per layer, layer 0 first)."""
    text = str(text).strip()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and value and all(isinstance(k, int) and not isinstance(k, bool) for k in value):
        return value
    raise InputError(f"--states {text!r}: give a whole number of states per layer (e.g. 256) or one per layer in "
                     "brackets, layer 0 first (e.g. \"[96,64,32]\").")
