"""The multi-state RNN step on one page: the spec the engine (model.py, attention.py, state.py) is tested against.

Oren et al., *Transformers are Multi-State RNNs* (arXiv 2401.06104): decoder layer l is an RNN

    (X^{l+1}_t, H^l_t) = f^l(X^l_t, H^l_{t-1})

whose state is the *multi-state* H^l_t = (K^l_t, V^l_t): one (key, value) pair per token the layer remembers. f^l
projects the new token, appends its pair (n -> n + 1), lets its query attend over all n + 1 pairs, and then a
policy pi keeps at most k of them (with no policy, the layer keeps all: the causal transformer). Here that is
plain PyTorch: one token, one batch row, a Python list of states per layer, no preallocated slots, no layer-major
chunks, no ring buffer. It reads the weights of a loaded `msrnn.Transformer` and calls the same `Policy` objects
(`priority`, `update`, `at_layer`, `budget`), so `tests/test_reference.py` can step it beside `model.step` and
`model.prefill` and require equal logits and equal kept positions. Shapes: H query heads, Hkv kv heads,
G = H / Hkv, hd head dim, d hidden size, n states held (n + 1 once the new one is in). fp32 is the reference.

Eviction, as the engine does it (state.LayerState.drop_lowest): while a kv head holds more than its budget, the
state of lowest priority goes, the oldest of equal priorities first; -inf means "drop now" (a kv head over budget
drops all its -inf states at once: the baseline); +inf means "must stay". A layer-wide priority (1, 1, n) applies to
every kv head; budget() may be an int or a tensor broadcastable to (1, Hkv, 1) (kv head h keeps budget[h]).

    ref = Reference(model, policy)                     # policy None: the unbounded transformer
    logits = [ref.step(token) for token in tokens]     # (vocab,) fp32 each
    ref.held()                                         # per layer, per kv head: the set of positions kept

Position schemes (`policy.positions`): absolute (keys rotated once, at their position); rebase (absolute, and at
the trained context the held states are renumbered 0..n-1); shift and loglog (keys kept un-rotated and rotated
at every use, at positions re-assigned inside the state: `rope.effective_positions`). All four are implemented.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import surprise
from .rope import cos_sin, effective_positions, inv_frequencies, rotate, rotates_at_use

EMPTY = -1  # the position a kv head gives a state it no longer holds (the policy contract's "empty slot")


@dataclass
class Memory:
    """One element of a layer's multi-state: the pair (k_j, v_j) of one remembered token j."""

    k: torch.Tensor  # (Hkv, hd) its key, rotated at its position (un-rotated if the scheme rotates at use)
    v: torch.Tensor  # (Hkv, hd) its value
    pos: torch.Tensor  # (Hkv,) int64 its position in each kv head, EMPTY where that kv head has dropped it
    score: torch.Tensor  # (Hkv,) fp32 the policy's running score of it (H2O's accumulated attention...), 0 at entry
    surprise: float = 0.0  # e_j: the largest surprisal of the `span` tokens up to j (needs_surprise: msrnn/surprise.py)


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """norm(x) = x / sqrt(mean(x^2) + eps) * w, in fp32."""
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight).to(x.dtype)


class Reference:
    """The bounded (or, with policy None, unbounded) multi-state RNN of a loaded Transformer, one token a step."""

    def __init__(self, model, policy=None):
        self.model, self.policy, self.cfg = model, policy, model.cfg
        self.scheme = policy.positions if policy is not None else "absolute"
        self.layers: list[list[Memory]] = [[] for _ in model.layers]  # H^l_0 = () in every layer
        self.t = 0  # the position the next token gets
        self.span = (surprise.settings(policy) or (1, 0))[0]  # e_t looks `span` tokens back (a surprise policy)
        self.logits, self.s = None, []  # the last prediction, and s_0, s_1, ...: -log p(x_t | x_<t), s_0 = 0

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """x_t -> logits (vocab,) fp32 for x_{t+1}; every layer's multi-state H^l_{t-1} -> H^l_t."""
        m, L = self.model, len(self.model.layers)
        if self.scheme == "rebase" and self.t >= self.cfg.max_position_embeddings:
            self.rebase()
        lg = self.logits  # (vocab,) the prediction of x_t, made by the step before
        self.s.append(0.0 if lg is None else float(torch.logsumexp(lg, -1) - lg[int(token)]))  # s_t
        self.e = max(self.s[-self.span:])  # e_t, the surprise every layer's new state of x_t carries
        x = m.embed.weight[int(token)]  # (d,) X^1_t
        for l, (block, memory) in enumerate(zip(m.layers, self.layers)):
            policy = self.policy.at_layer(l, L) if self.policy is not None else None  # pi for layer l (its own k)
            x = x + block.o(self.attend(block, rms_norm(x, block.attn_norm), memory, policy))  # (d,) Y = X + W_O o
            gate, up = block.gate_up(rms_norm(x, block.mlp_norm)).chunk(2)  # (I,) each: W_gate norm(Y), W_up norm(Y)
            x = x + block.down(F.silu(gate) * up)  # (d,) X^{l+1}_t
        self.t += 1
        self.logits = m._logits(rms_norm(x, m.norm))  # (vocab,) fp32: tied embedding or lm_head
        return self.logits

    def attend(self, block, h: torch.Tensor, memory: list[Memory], policy) -> torch.Tensor:
        """Equations (1)-(3) of docs/derivation.md and the policy: returns the heads' output o (H*hd,)."""
        cfg, t = self.cfg, self.t
        H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        G = H // Hkv  # query head i reads kv head i // G
        q, k, v = block.qkv(h).view(H + 2 * Hkv, hd).split([H, Hkv, Hkv])  # (H, hd), (Hkv, hd), (Hkv, hd)
        inv_freq = inv_frequencies(cfg.rope, hd, cfg.max_position_embeddings, t + 1)  # (hd/2,) (dynamic: t + 1 seen)
        at_use = rotates_at_use(self.scheme)
        if not at_use:  # (1) q_t = R_t W_Q norm(X), k_t = R_t W_K norm(X): the key is cached rotated, once
            cos, sin = cos_sin(torch.tensor(t), inv_freq, q.dtype)  # (hd,) each
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # (H, hd), (Hkv, hd)
        # (2) the state grows: K_t = [K_{t-1}; k_t], V_t = [V_{t-1}; v_t]   (n -> n + 1)
        memory.append(Memory(k, v, torch.full((Hkv,), t), torch.zeros(Hkv), self.e))
        K = torch.stack([s.k for s in memory], dim=1)  # (Hkv, n+1, hd)
        V = torch.stack([s.v for s in memory], dim=1)  # (Hkv, n+1, hd)
        pos = torch.stack([s.pos for s in memory], dim=1)  # (Hkv, n+1) EMPTY: not held by that kv head
        held = pos != EMPTY  # (Hkv, n+1)
        qg = q.view(Hkv, G, hd)  # (Hkv, G, hd) each kv head's group of query heads
        if at_use:  # shift / loglog: rotate every held key, and the query, at positions re-assigned in the state
            eff = effective_positions(pos, self.scheme)  # (Hkv, n+1) float; the new token is the last
            cos, sin = cos_sin(eff, inv_freq, q.dtype)  # (Hkv, n+1, hd) each
            K = rotate(K, cos, sin)  # (Hkv, n+1, hd)
            qg = rotate(qg, cos[:, -1:], sin[:, -1:])  # (Hkv, G, hd) at the new token's own position
        # (3) p_{t,i} = softmax(q_{t,i} K^T / sqrt(hd)) over the states the kv head holds, o_{t,i} = p_{t,i} V
        visible = held  # (Hkv, n+1) causal by construction: the state holds only the past and the present
        if cfg.sliding_window is not None:  # Mistral: a state w or more tokens back is invisible (not evicted)
            visible = visible & (t - pos < cfg.sliding_window)
        scores = (qg @ K.transpose(-1, -2)) / math.sqrt(hd)  # (Hkv, G, n+1)
        p = scores.masked_fill(~visible[:, None], -math.inf).softmax(-1, dtype=torch.float32)  # (Hkv, G, n+1)
        o = (p.to(V.dtype) @ V).reshape(H * hd)  # (H*hd,) the heads side by side
        if policy is not None:
            self.evict(policy, memory, p.reshape(1, H, -1), qg.reshape(1, H, hd), inv_freq)  # (1, H, n+1) per query head
        return o

    def evict(self, policy, memory: list[Memory], attn: torch.Tensor, query: torch.Tensor, inv_freq) -> None:
        """H^l_t = pi_k(K_t, V_t; p_t): ask the policy for a priority s_j per state, and in every kv head h keep
        its top budget[h] states. attn (1, H, n+1) is the new query's attention; query (1, H, hd) that query, as it
        attended (rotated), and inv_freq (hd/2,) the RoPE frequencies it was rotated with."""
        Hkv = self.cfg.num_key_value_heads
        pos = torch.stack([s.pos for s in memory], dim=1)[None]  # (1, Hkv, n+1) the contract's positions
        score = torch.stack([s.score for s in memory], dim=1)[None]  # (1, Hkv, n+1)
        if policy.keeps_score:  # a running score (H2O: A_j += the attention state j just got), then ranked on
            score = policy.update(score, attn[:, :, None]).expand(1, Hkv, -1)  # attn as (B, H, T=1, n+1)
            for j, s in enumerate(memory):
                s.score = score[0, :, j].clone()  # (Hkv,)
        budget = torch.as_tensor(policy.budget()).expand(1, Hkv, 1)[0, :, 0]  # (Hkv,) k per kv head
        held = pos[0] != EMPTY  # (Hkv, n+1)
        if not bool((held.sum(-1) > budget).any()):
            return  # n + 1 <= k in every kv head: nothing to drop
        extra = {}  # what the policy asked for (needs_keys: KeyDiff; needs_values; needs_value_norms: tova-value)
        if policy.needs_queries:  # the newest query and its RoPE frequencies (expected-attention)
            extra["queries"], extra["inv_freq"] = query, inv_freq
        if policy.needs_keys:
            extra["keys"] = torch.stack([s.k for s in memory], dim=1)[None]  # (1, Hkv, n+1, hd) as cached
        if policy.needs_values or policy.needs_value_norms:
            values = torch.stack([s.v for s in memory], dim=1)[None]  # (1, Hkv, n+1, hd)
            if policy.needs_values:
                extra["values"] = values
            if policy.needs_value_norms:
                extra["value_norms"] = values.float().abs().sum(-1)  # (1, Hkv, n+1) |v_j|_1
        if policy.needs_surprise:  # e_j per state (the engine knows the newest's after the call: +inf, kept)
            extra["surprise"] = torch.tensor([s.surprise for s in memory]).expand(1, Hkv, -1)  # (1, Hkv, n+1)
        prio = policy.priority(attn, pos, score, **extra)  # (1, 1 or Hkv, n+1): one decision per layer or kv head
        prio = prio.float().expand(1, Hkv, -1)[0]  # (Hkv, n+1) a layer-wide priority applies to every kv head
        assert not bool(prio.isnan().any()), f"policy {policy.name!r} returned NaN priorities"
        for h in range(Hkv):
            live = held[h].nonzero()[:, 0]  # (m,) the states kv head h holds, oldest first (the list's order)
            if len(live) <= budget[h]:
                continue
            for j in live[prio[h, live] == -math.inf]:  # -inf: "drop now" (the baseline drops everything)
                memory[j].pos[h] = EMPTY
            live = live[prio[h, live] > -math.inf]
            while len(live) > budget[h]:  # drop the lowest priority; argmin takes the first = the oldest of equals
                j = live[prio[h, live].argmin()]
                memory[j].pos[h] = EMPTY
                live = live[live != j]
        memory[:] = [s for s in memory if bool((s.pos != EMPTY).any())]  # a state no kv head holds is gone

    def rebase(self) -> None:
        """The `rebase` scheme at the trained context: in every layer and kv head, renumber the held states
        0..n-1 in position order and turn their keys by the difference, R(new - old) R(old) k = R(new) k; the
        stream goes on after the largest new position."""
        cfg, top = self.cfg, -1
        inv_freq = inv_frequencies(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)  # (hd/2,) unscaled
        for memory in self.layers:
            if not memory:
                continue
            old = torch.stack([s.pos for s in memory], dim=1)  # (Hkv, n)
            new = effective_positions(old, "shift").long().masked_fill(old == EMPTY, EMPTY)  # (Hkv, n) ranks
            cos, sin = cos_sin((new - old).masked_fill(old == EMPTY, 0), inv_freq, memory[0].k.dtype)  # (Hkv, n, hd)
            for j, s in enumerate(memory):
                s.k, s.pos = rotate(s.k, cos[:, j], sin[:, j]), new[:, j]  # (Hkv, hd), (Hkv,)
            top = max(top, int(new.max()))
        self.t = top + 1

    def held(self) -> list[list[set[int]]]:
        """For every layer, for every kv head, the set of positions it holds (what the policy kept)."""
        Hkv = self.cfg.num_key_value_heads
        return [[{int(s.pos[h]) for s in memory if s.pos[h] != EMPTY} for h in range(Hkv)] for memory in self.layers]
