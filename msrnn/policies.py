"""Policies: what turns the unbounded multi-state into a bounded one.

After the new token has attended to all n+1 states of a layer, the model asks the layer's policy which states to keep
when there are more than `states` (k) of them. A policy answers with a *priority* per state: the model keeps the k
states of highest priority (an exact tie is broken arbitrarily) and drops every state whose priority is -inf.
Constant +inf marks a state that must stay (attention sinks, a recent window).

What a policy sees (plain tensors; no model needed in a unit test):
    attn   (B, H, n)    fp32 attention probabilities of the newest query, per query head (sums to 1 over n)
    pos    (B, Hkv, n)  int64 absolute position of each state (-1 = empty slot), per kv head
    score  (B, Hkv, n)  fp32 the running score this policy keeps in the state (see `update`)
and returns priority (B, 1, n) for a layer-wise decision or (B, Hkv, n) for one per kv head. Query head h reads kv
head h // G with G = H / Hkv, so `attn.view(B, Hkv, G, n)` groups a kv head's query heads.

A policy that keeps a running score (H2O) overrides `update(score, attn)`, called once per forward call with the
probabilities of all T new queries, attn (B, H, T, n); T is 1 in the recurrence and larger only in a parallel prefill.
"""
from __future__ import annotations

import torch

from .errors import InputError

INF = float("inf")


class Policy:
    """Base class. Subclasses set `name` and implement `priority` (and `update` if they keep a score)."""

    name = "policy"
    needs_attention = True  # False: priority ignores `attn` (window, sinks...), so no probabilities are needed
    min_states = 1  # the smallest budget that makes sense for this policy

    def __init__(self, states: int, positions: str = "absolute"):
        if isinstance(states, bool) or not isinstance(states, int) or states < self.min_states:
            raise InputError(f"{self.name}: states={states!r} is not a valid budget; give an integer >= {self.min_states}.")
        if positions not in POSITION_SCHEMES:
            raise InputError(f"positions={positions!r} is unknown; choose one of {', '.join(POSITION_SCHEMES)}.")
        self.states = states  # k: the most states a layer keeps after each step
        self.positions = positions

    def update(self, score: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return score

    def priority(self, attn: torch.Tensor, pos: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(states={self.states})"


def per_kv_head(attn: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, ...) -> (B, Hkv, G, ...): each kv head's group of query heads."""
    return attn.view(attn.shape[0], kv_heads, -1, *attn.shape[2:])


def newest(pos: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, 1) the position of the newest state of each row (it is always present when the policy runs)."""
    return pos.max(dim=-1, keepdim=True).values


class Full(Policy):
    """Unbounded: never evicts. The multi-state RNN that *is* the transformer."""

    name = "full"
    needs_attention = False

    def __init__(self, states: int | None = None, positions: str = "absolute"):
        self.states, self.positions = None, positions

    def priority(self, attn, pos, score):
        return pos.float()

    def __repr__(self) -> str:
        return "Full()"


class Window(Policy):
    """Keep the k most recent states (FIFO). The new token attends to k + 1 tokens: Mistral's sliding_window = k+1."""

    name = "window"
    needs_attention = False

    def priority(self, attn, pos, score):
        return pos.float()  # newer = higher


class Sinks(Policy):
    """StreamingLLM's Window+i: the first `sinks` tokens of the stream are kept forever, plus the k - i most recent."""

    name = "sinks"
    needs_attention = False

    def __init__(self, states: int, sinks: int = 4, positions: str = "absolute"):
        super().__init__(states, positions)
        if sinks < 0 or sinks >= states:
            raise InputError(f"sinks: {sinks} sink tokens leave no room for a window in states={states}; "
                             f"give states > sinks (e.g. states={sinks + 60}) or fewer sinks.")
        self.sinks = sinks

    def priority(self, attn, pos, score):
        return pos.float().masked_fill(pos < self.sinks, INF)


class TOVA(Policy):
    """TOVA (layer-wise): drop the state the newest query attends to least, averaged over all the layer's heads."""

    name = "tova"

    def priority(self, attn, pos, score):
        return attn.mean(dim=1, keepdim=True)  # (B, 1, n) one decision for the whole layer


class TOVAHead(Policy):
    """TOVA per kv head: each kv head drops the state its own query heads attend to least."""

    name = "tova-head"

    def priority(self, attn, pos, score):
        return per_kv_head(attn, pos.shape[1]).mean(dim=2)  # (B, Hkv, n)


class H2O(Policy):
    """H2O (head-wise): keep the heavy hitters, the states with most attention *accumulated* over all past queries,
    and always the k // 2 most recent states."""

    name = "h2o"
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


POSITION_SCHEMES = ("absolute", "shift", "loglog")
POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (Full, Window, Sinks, TOVA, TOVAHead, H2O, H2OLayer, Baseline)
}


def make_policy(name: str, states: int | None = None, **kwargs) -> Policy | None:
    """The policy called `name` (as the CLI spells it) with budget `states`; `full` gives None (unbounded)."""
    if name not in POLICIES:
        raise InputError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}.")
    if name == "full":
        return None
    if states is None:
        raise InputError(f"policy {name!r} needs a budget: give states=k (e.g. --states 256).")
    return POLICIES[name](states, **kwargs)
