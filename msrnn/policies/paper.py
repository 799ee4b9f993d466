"""The paper's policies (Oren et al. 2024, and the baselines it compares TOVA with): Window, Sinks (StreamingLLM),
TOVA layer-wise and per kv head, H2O head-wise and layer-wise, and the chunked Baseline."""
from __future__ import annotations

import torch

from ..errors import InputError
from .base import INF, Policy, newest, per_kv_head, whole


class Window(Policy):
    """Keep the k most recent states (FIFO). The new token attends to k + 1 tokens: Mistral's sliding_window = k+1."""

    name = "window"
    drops = False
    needs_attention = False

    def priority(self, attn, pos, score):
        return pos.float()  # newer = higher


class Sinks(Policy):
    """StreamingLLM's Window+i: the first `sinks` tokens of the stream are kept forever, plus the k - i most recent."""

    name = "sinks"
    drops = False
    needs_attention = False

    def __init__(self, states: int, sinks: int = 4, positions: str = "absolute"):
        super().__init__(states, positions)
        sinks = whole(self.name, "sinks", sinks)
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
