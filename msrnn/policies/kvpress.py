"""kvpress's field: policies from later papers, in the same contract. SnapKV (the observation window's votes),
PyramidKV (SnapKV with a budget per layer), KeyDiff (keys that point away from the mean key) and ExpectedAttention
(the attention future queries can be expected to give, under RoPE)."""
from __future__ import annotations

import math

import torch

from ..errors import InputError
from ..rope import rotate, rotates_at_use
from .base import INF, Policy, newest, per_kv_head, whole


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
        return outlying(keys, pos)


def outlying(keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """KeyDiff's score (B, Hkv, n) fp32: -cos(k_j, the mean direction of the keys held), per kv head; keys
    (B, Hkv, n, hd), pos (B, Hkv, n) with -1 for an empty slot (not part of the mean)."""
    # in fp64: the average runs over the held slots in slot order, which differs between the layer-major scan and
    # the token-by-token recurrence; fp32 rounding could then flip a near-tie between them
    keys = keys.double()
    held = (pos != -1)[..., None]  # (B, Hkv, n, 1)
    unit = torch.nn.functional.normalize(keys, dim=-1) * held  # (B, Hkv, n, hd)
    anchor = unit.sum(dim=2, keepdim=True) / held.sum(dim=2, keepdim=True).clamp(min=1)  # (B, Hkv, 1, hd)
    return -torch.nn.functional.cosine_similarity(keys, anchor, dim=-1).float()  # (B, Hkv, n)



class ExpectedAttention(Policy):
    """Expected attention (kvpress's ExpectedAttentionPress, Devoto et al. 2025): rank each state by the attention
    that *future* queries can be expected to give it, not the one the newest query gave it. Under RoPE a query i
    positions ahead meets key k_j turned by R_i, so a future query is modelled from the newest one, q (rotated at
    its position t), turned on by the mean rotation of the next n positions, per query head h:

        qbar_h = (1/n) sum_{i=1..n} R_i q_h  =  q_h * c + rotate_half(q_h) * s,   c = mean_i cos(i w), s = mean_i sin(i w)
        a_hj   = softmax_j(qbar_h . k_j / sqrt(hd))                       over the states the kv head holds
        priority_j = (mean_{h in kv head's group} a_hj + epsilon) * ||v_j||_2,    the first `sinks` tokens: +inf

    (w: the layer's RoPE frequencies inv_freq; the mean of the rotations is the rotation by the mean cos and sin,
    as rotation is linear in them). kvpress estimates a Gaussian of future queries from a prompt's queries, mean mu
    and covariance Sigma (un-rotated, from the hidden states), turned by the same mean rotation, and scores
    exp(mu.k/sqrt(d) + k^T Sigma k / (2d)) (E[exp(q.k/sqrt(d))] of q ~ N(mu, Sigma)), normalised, times ||v||_2.
    A msrnn policy decides at every step and keeps no statistics but a score per state, so here the mean is the
    newest query alone and Sigma = 0: kvpress's `use_covariance=False`, re-estimated at every token (a moving
    estimate of the next queries, where kvpress fixes one at the end of the prompt). The newest query comes through
    the contract's `needs_queries` (queries (B, H, hd), inv_freq (hd/2,)). Defaults as kvpress's: n = 512
    future positions, 4 sinks, epsilon 0. Head-wise, in fp64 (the softmax sums over held slots in slot order,
    which differs between the layer-major scan and the token-by-token recurrence). Positions that rotate keys at
    use (shift, loglog) are refused: keys are cached un-rotated there; rebase is fine (queries and keys are
    renumbered together). Mistral's sliding window is not modelled (a state past it still gets its score)."""

    name = "expected-attention"
    needs_attention = False
    needs_keys = True
    needs_values = True  # ||v_j||_2 (the state's value_norms are L1)
    needs_queries = True
    drops = False

    def __init__(self, states: int, future: int = 512, sinks: int = 4, epsilon: float = 0.0,
                 positions: str = "absolute"):
        super().__init__(states, positions)
        if rotates_at_use(positions):
            raise InputError(f"{self.name}: positions={positions!r} rotates keys at every use, which this policy "
                             "does not model; use positions='absolute' or 'rebase'.")
        self.future, self.sinks = whole(self.name, "future", future), whole(self.name, "sinks", sinks)
        if future < 1:
            raise InputError(f"{self.name}: future={future} must be >= 1 (how many next positions are averaged).")
        if sinks < 0 or sinks >= states:
            raise InputError(f"{self.name}: {sinks} sink tokens leave no room in states={states}; give states > "
                             f"sinks (e.g. states={sinks + 60}) or fewer sinks.")
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon >= 0:
            raise InputError(f"{self.name}: epsilon={epsilon!r} must be a number >= 0.")
        self.epsilon = float(epsilon)

    def future_query(self, queries, inv_freq) -> torch.Tensor:
        """(..., hd) fp64: each query turned by the mean rotation of the next `future` positions."""
        steps = torch.arange(1, self.future + 1, dtype=torch.float64, device=queries.device)  # (n,)
        angles = steps[:, None] * inv_freq.to(queries.device, torch.float64)  # (n, hd/2)
        c, s = angles.cos().mean(0), angles.sin().mean(0)  # (hd/2,) each
        return rotate(queries.double(), torch.cat((c, c)), torch.cat((s, s)))

    def priority(self, attn, pos, score, keys=None, values=None, queries=None, inv_freq=None):
        B, Hkv, n, hd = keys.shape
        qbar = self.future_query(queries, inv_freq).view(B, Hkv, -1, hd)  # (B, Hkv, G, hd)
        logits = (qbar @ keys.double().transpose(-1, -2)) / math.sqrt(hd)  # (B, Hkv, G, n)
        logits = logits.masked_fill((pos == -1)[:, :, None], -INF)  # an empty slot takes no share
        expected = logits.softmax(dim=-1).mean(dim=2)  # (B, Hkv, n) the group's mean expected attention
        prio = (expected + self.epsilon) * values.double().norm(dim=-1)  # times ||v_j||_2
        return prio.float().masked_fill(pos < self.sinks, INF)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(states={self.states}, future={self.future}, sinks={self.sinks}, "
                f"epsilon={self.epsilon})")
