"""Llama/Mistral written as a multi-state RNN.

    logits, state = model.step(tokens, state, policy)      # one token per row; the state is updated in place

A decoder layer's "hidden state" is the set of (key, value) pairs of every token it has seen: the multi-state. A new
token adds its own pair, attends over all n+1 pairs, and the policy then keeps at most k of them. With no policy the
state grows forever and the recurrence computes exactly the causal transformer; `model(tokens)` is that same function
evaluated for all positions at once and serves as the reference.

Every entry point runs one loop, `_advance`, over T new tokens per row, layer-major: each layer takes all T tokens
before the next one starts. T = 1 is the recurrence (`step`); T > 1 a chunk of a prefill, parallel where no
eviction can happen and otherwise `scan`: the same recurrence, with only attention and eviction stepped token by
token (weights are then read once per chunk, not once per token). Shapes: B batch rows, T new tokens, d hidden size, H query heads, Hkv kv heads,
G = H / Hkv query heads per kv head, hd head dim, S states held by a layer after adding the new ones (n + T).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config
from .errors import InputError
from .policies import Policy, check_priority, layer_budgets
from .rope import cos_sin, effective_positions, inv_frequencies, rotate, rotates_at_use
from .state import EMPTY, INF, State


PREFILL_MODES = ("exact", "fast")  # the recurrence itself (layer-major), or one parallel pass + one eviction


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / sqrt(mean(x^2) + eps), computed in fp32 whatever the model's dtype (as transformers does), then scaled
        if x.dtype == torch.float32 == self.weight.dtype:  # the same product, in one kernel
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class Block(nn.Module):
    """One decoder layer: pre-norm attention over the layer's multi-state, then a pre-norm SwiGLU MLP."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        H, Hkv, hd, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qkv = nn.Linear(d, (H + 2 * Hkv) * hd, bias=cfg.attention_bias)  # q_proj | k_proj | v_proj, fused
        self.o = nn.Linear(H * hd, d, bias=cfg.attention_bias)
        self.mlp_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.gate_up = nn.Linear(d, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)  # gate_proj | up_proj, fused
        self.down = nn.Linear(cfg.intermediate_size, d, bias=cfg.mlp_bias)

    def forward(self, x, layer_state, pos, rope, policy: Policy | None, each_token: bool = True):
        """x (B, T, d) -> (B, T, d): T new tokens through this layer; layer_state grows by T, the policy bounds it.

        rope = (inv_freq, cos, sin) of the new tokens' absolute positions pos (B, T); inv_freq is (hd/2,), or
        (T, hd/2) when each token has its own (dynamic scaling, token by token). each_token: the policy evicts after
        every token (the recurrence, run here layer-major: see `scan`); False: once, after the whole chunk (fast
        prefill)."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv = self.qkv(self.attn_norm(x)).view(B, T, H + 2 * Hkv, hd)  # (B, T, heads of q | k | v, hd)
        inv_freq, cos, sin = rope
        scheme = policy.positions if policy is not None else "absolute"
        if not rotates_at_use(scheme):  # keys are cached rotated, once, at their (absolute or rebased) position
            qk = rotate(qkv[:, :, : H + Hkv], cos[:, :, None], sin[:, :, None])  # q and k heads in one rotation
            qkv = torch.cat([qk, qkv[:, :, H + Hkv :]], dim=2)
        q, k, v = qkv.split([H, Hkv, Hkv], dim=2)
        q = q.view(B, T, Hkv, H // Hkv, hd).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, T, hd)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, hd)
        out = attend(q, k, v, layer_state, pos, policy, each_token, scheme, inv_freq, cfg.sliding_window)
        x = x + self.o(out)  # out (B, T, H*hd)
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)  # (B, T, I) each
        return x + self.down(F.silu(gate) * up)


def attend(q, k, v, layer_state, pos, policy: Policy | None, each_token: bool = True, scheme: str = "absolute",
           inv_freq=None, window=None, valid=None, fused: bool = False) -> torch.Tensor:
    """One layer's attention as the recurrence: T new tokens enter `layer_state`, attend, and the policy bounds it.

    q (B, Hkv, G, T, hd) queries; k, v (B, Hkv, T, hd) the new keys and values (rotated at their absolute positions
    unless the scheme rotates at use); pos (B, T) their absolute positions. Returns the attention output (B, T, H*hd).
    `Block.forward` calls it between the projections; `msrnn.hf` calls it from inside a transformers model, which
    is what makes a policy behave the same there by construction. Two arguments exist for that bridge only:
    valid (B, T) bool marks padding tokens False: one never enters the state, and its query neither updates a score
    nor evicts (its output is zeros); fused=True computes the attention of a policy that needs no probabilities
    (window, sinks...) with torch's scaled_dot_product_attention instead of an explicit softmax."""
    B, Hkv, G, T, hd = q.shape
    H = Hkv * G
    bounded = policy is not None and policy.states is not None
    if valid is not None:
        pos = pos.masked_fill(~valid, EMPTY)  # a padding token never enters: its slot is EMPTY from the start
    elif bounded and each_token and T == 1 and not rotates_at_use(scheme) and layer_state.holds_exactly(policy):
        return ring_step(q, k, v, layer_state, pos, policy, window)  # the common decode step, in fewer operations
    if bounded and each_token and T > 1:
        layer_state.sort_by_position()  # then every candidate slot is in position order (see scan)
    n0 = layer_state.size
    layer_state.append(k, v, pos)  # n -> n + T states (the candidates)
    # Queries 0..first-1 cannot cause an eviction (the layer holds <= k states until then): one parallel call.
    first = T if not bounded or not each_token else min(max(policy.min_budget() - n0, 0), T)
    if rotates_at_use(scheme) and inv_freq.dim() == 2:
        first = 0  # per-token dynamic RoPE re-rotates every kept key at each step: no parallel shortcut
    S = layer_state.size
    needs_probs = bounded and (policy.needs_attention or policy.keeps_score)
    if fused and not needs_probs and not rotates_at_use(scheme) and first:  # the output without the probabilities
        probs, out = None, fused_attention(q[:, :, :, :first], layer_state, pos[:, :first], window)
    else:
        probs, out = attend_parallel(q[:, :, :, :first], layer_state, pos[:, :first], scheme, inv_freq, S - T,
                                     window), None
        if valid is not None:  # a padding query attends to nothing
            probs = probs.masked_fill(~valid[:, None, None, :first, None], 0.0)
    if bounded and policy.keeps_score and first:
        layer_state.score[:, :, :S] = update_score(policy, layer_state.score[:, :, :S],
                                                   probs.reshape(B, H, first, S), valid)
    if bounded and not each_token and S > policy.min_budget():  # fast: one eviction by the last query
        kpos = layer_state.pos[:, :, :S]
        last = probs.reshape(B, H, T, S)[:, :, -1] if probs is not None else None
        prio = ask(policy, last, kpos, layer_state.score[:, :, :S], layer_state, S)
        layer_state.keep_top(check_priority(policy, prio, kpos, nan=True), policy.budget())
    if layer_state.trace is not None and first:  # what the layer holds after the parallel part's last token
        layer_state.trace(pos[:, first - 1], layer_state.pos[:, :, : n0 + first])
    if first < T:  # the recurrence: attend, then evict, one token at a time
        inv_scan = inv_freq[first:] if inv_freq is not None and inv_freq.dim() == 2 else inv_freq
        rest = scan(q[:, :, :, first:], layer_state, n0 + first, policy, scheme, inv_scan, window,
                    None if valid is None else valid[:, first:])
        if out is None:
            probs = torch.cat([probs, rest], dim=3)
        else:  # fused parallel part: the recurrence's part gets its own product
            out = torch.cat([out.view(B, Hkv, G, first, hd), rest.to(v.dtype) @ layer_state.values[:, :, None, :S]], 3)
    if out is None:
        out = probs.to(v.dtype).view(B, Hkv, -1, S) @ layer_state.values[:, :, :S]  # (B, Hkv, G*T, hd)
    if bounded:
        layer_state.compact()  # evicted slots go to the newest survivors: the layer holds <= k slots again
    return out.view(B, Hkv, G, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, H * hd)  # (B, T, H*hd)


def ring_step(q, k, v, layer_state, pos, policy: Policy, window) -> torch.Tensor:
    """One token through a layer that holds exactly its k states: the recurrence's steady state, as one write.

    The newest state enters the spare slot, its query attends over the k + 1 states, and the state of lowest
    priority gives its slot to the newest (mistral-inference's ring buffer, `pos % window`, generalised to any
    policy). Same arithmetic as `scan` with T = 1, without the bookkeeping a chunk or a ragged batch needs."""
    B, Hkv, G, _, hd = q.shape
    layer_state.append(k, v, pos)  # k -> k + 1 candidates, the newest in the last slot
    S = layer_state.size
    kpos, score = layer_state.pos[:, :, :S], layer_state.score[:, :, :S]  # (B, Hkv, S) views
    probs = attention_probs(q, layer_state.keys[:, :, :S], pos, kpos, window, all_visible=window is None)
    out = probs.view(B, Hkv, G, S).to(v.dtype) @ layer_state.values[:, :, :S]  # (B, Hkv, G, hd), before a slot is reused
    attn = probs.view(B, Hkv * G, S) if policy.needs_attention or policy.keeps_score else None  # (B, H, S)
    if policy.keeps_score:
        score.copy_(policy.update(score, attn[:, :, None]))
    prio = ask(policy, attn, kpos, score, layer_state, S)  # (B, 1 or Hkv, S)
    layer_state.replace_lowest(check_priority(policy, prio, kpos, nan=True))
    if layer_state.trace is not None:
        layer_state.trace(pos[:, 0], layer_state.pos[:, :, : S - 1])
    return out.view(B, Hkv * G * hd)[:, None]  # (B, 1, H*hd)


def ask(policy: Policy, attn, pos, score, layer_state, S: int):
    """policy.priority(attn, pos, score), and the layer's keys and/or values (B, Hkv, S, hd) for a policy that asks
    for them (needs_keys: KeyDiff; needs_values: tova-value). Slots do not move inside a scan: one view serves."""
    extra = {"keys": layer_state.keys[:, :, :S]} if policy.needs_keys else {}
    if policy.needs_values:
        extra["values"] = layer_state.values[:, :, :S]
    return policy.priority(attn, pos, score, **extra)


def update_score(policy: Policy, score, attn, valid=None):
    """policy.update over T queries attn (B, H, T, n); with valid (B, T), a padding query leaves its row's score as
    it was (a zero attention is not neutral for every update: a moving average would decay)."""
    if valid is None:
        return policy.update(score, attn)
    for t in range(attn.shape[2]):
        score = torch.where(valid[:, t, None, None], policy.update(score, attn[:, :, t : t + 1]), score)
    return score


def attend_parallel(q, layer_state, qpos, scheme, inv_freq, new_at, window):
    """Probabilities (B, Hkv, G, T, S) of T queries over the layer's S states when none is evicted between
    them. Keys of a rotate-at-use scheme are rotated here at their effective positions; query t sits where its
    own key (slot new_at + t) sits."""
    S, (B, Hkv, G, T, _) = layer_state.size, q.shape
    if T == 0:
        return torch.empty(B, Hkv, G, 0, S, device=q.device)
    kpos, keys = layer_state.pos[:, :, :S], layer_state.keys[:, :, :S]
    if rotates_at_use(scheme):  # raw keys cached; positions re-assigned inside the state at every use
        c, s = cos_sin(effective_positions(kpos, scheme), inv_freq, q.dtype)  # (B, Hkv, S, hd)
        keys = rotate(keys, c, s)
        q = rotate(q, c[:, :, None, new_at : new_at + T], s[:, :, None, new_at : new_at + T])
    last_is_newest = new_at + T == S  # no later token is in the layer yet
    all_visible = T == 1 and last_is_newest and window is None and not layer_state.maybe_empty
    return attention_probs(q, keys, qpos, kpos, window, all_visible)


def fused_attention(q, layer_state, qpos, window):
    """The output (B, Hkv, G*T, hd) of T queries over the layer's states without materialising probabilities:
    torch's fused kernel with the same visibility as attention_probs (for policies that never read attention)."""
    B, Hkv, G, T, hd = q.shape
    S = layer_state.size
    kpos = layer_state.pos[:, :, :S]
    age = qpos[:, None, :, None] - kpos[:, :, None, :]  # (B, Hkv, T, S)
    visible = (kpos[:, :, None, :] != EMPTY) & (age >= 0)
    if window is not None:
        visible &= age < window
    mask = visible[:, :, None].expand(B, Hkv, G, T, S).reshape(B, Hkv, G * T, S)
    return F.scaled_dot_product_attention(q.reshape(B, Hkv, G * T, hd), layer_state.keys[:, :, :S],
                                          layer_state.values[:, :, :S], attn_mask=mask)


def scan(q, layer_state, start, policy: Policy, scheme: str, inv_freq, window, valid=None) -> torch.Tensor:
    """The bounded recurrence of one layer over T queries whose keys and values are already in the layer (slots
    start .. start+T-1, after the states kept so far): token t enters, its query attends to every state held, and
    the policy drops what is over budget, before token t+1 enters. Returns the probabilities (B, Hkv, G, T, S).

    This is where the model runs *layer-major*: every other part of the layer (projections, MLP) saw all T tokens
    in one matrix product. It is exact because a policy decides from its own layer alone (Policy.layer_local): the
    layer's inputs for all T tokens are known once the layer below has run. Nothing moves inside the loop; an
    evicted state only gets position EMPTY, so the scores of all T queries against all S slots are one product,
    and a step is a masked softmax, the policy, and one scatter. valid (B, T): see `attend` (False = padding).
    """
    B, Hkv, G, T, hd = q.shape
    S = layer_state.size
    pos = layer_state.pos[:, :, :S]  # (B, Hkv, S) a view: EMPTY = not held (evicted, or not entered yet)
    true_pos = pos.clone()  # (B, Hkv, S) where each candidate state sits in the stream
    entering = true_pos[:, :, start:]  # (B, Hkv, T) the new tokens, in order
    pos[:, :, start:] = EMPTY
    qpos = entering[:, 0]  # (B, T)
    too_old = None  # step-major buffers below ((T, ...) first): what step t reads is contiguous
    if window is not None:  # Mistral: a state further back than the window is invisible (not evicted)
        too_old = (qpos.T[:, :, None, None] - true_pos[None]) >= window  # (T, B, Hkv, S)
    scores = None
    if not rotates_at_use(scheme):  # keys do not move: all T queries against all S slots at once
        scores = (q.reshape(B, Hkv, G * T, hd) @ layer_state.keys[:, :, :S].transpose(-1, -2)).view(B, Hkv, G, T, S)
        scores = (scores * (1.0 / math.sqrt(hd))).permute(3, 0, 1, 2, 4).contiguous()  # (T, B, Hkv, G, S)
    probs = torch.empty(T, B, Hkv, G, S, device=q.device)  # fp32
    needs_attn = policy.needs_attention or policy.keeps_score
    budget, overfull = policy.budget(), start > policy.min_budget()  # a state continued under a smaller budget
    # The common case in fewer operations: one budget, rows that all hold the same number of states, no "drop now"
    # priorities, and slots in position order (Block.forward sorted them), so argmin's first minimum is the oldest.
    plain, live = T > 1 and not overfull and not policy.drops and isinstance(budget, int) and valid is None, 0
    if plain:  # (a decode step, T = 1, skips these two host syncs)
        counts = (pos[:, :, :start] != EMPTY).sum(-1)  # (B, Hkv)
        live = int(counts.max())
        plain = live == int(counts.min())
    lowest, hidden = torch.finfo(q.dtype).min, torch.empty_like(pos, dtype=torch.bool)
    score = layer_state.score[:, :, :S]  # (B, Hkv, S) a view
    for t in range(T):
        pos.select(2, start + t).copy_(entering.select(2, t))  # token t enters: n -> n + 1 states
        torch.eq(pos, EMPTY, out=hidden)  # (B, Hkv, S)
        if scores is None:  # rotate at use: each step re-assigns the effective positions of what is held
            inv = inv_freq[t] if inv_freq.dim() == 2 else inv_freq
            c, s = cos_sin(effective_positions(pos, scheme), inv, q.dtype)  # (B, Hkv, S, hd)
            qt = rotate(q[:, :, :, t], c[:, :, None, start + t], s[:, :, None, start + t])  # (B, Hkv, G, hd)
            row = (qt @ rotate(layer_state.keys[:, :, :S], c, s).transpose(-1, -2)) * (1.0 / math.sqrt(hd))
        else:
            row = scores[t]  # (B, Hkv, G, S)
        mask = hidden if too_old is None else hidden | too_old[t]
        p = F.softmax(row.masked_fill(mask[:, :, None], lowest), dim=-1, dtype=torch.float32)  # (B, Hkv, G, S)
        if valid is not None:
            p = p * valid[:, t, None, None, None]  # a padding query attends to nothing
        probs.select(0, t).copy_(p)
        attn = p.view(B, Hkv * G, S) if needs_attn else None  # (B, H, S) query head h = kv head h // G
        if policy.keeps_score:
            score.copy_(update_score(policy, score, attn[:, :, None], None if valid is None else valid[:, t : t + 1]))
        prio = check_priority(policy, ask(policy, attn, pos, score, layer_state, S), pos, nan=t == T - 1)  # NaN: once a chunk
        if plain:
            live += 1
            if live > budget:  # one state out: the lowest priority (the oldest of equals: slots are in order)
                slot = prio.float().expand(pos.shape).masked_fill(hidden, INF).argmin(dim=-1, keepdim=True)
                pos.scatter_(2, slot, EMPTY)
                live -= 1
        elif overfull and t == 0:
            layer_state.keep_top(prio, budget)
        else:
            layer_state.drop_lowest(prio, budget, hidden)
        if layer_state.trace is not None:
            layer_state.trace(qpos[:, t], pos)
    return probs.permute(1, 2, 3, 0, 4)  # (B, Hkv, G, T, S)


def attention_probs(q, keys, qpos, kpos, window, all_visible=False):
    """Softmax attention probabilities of T queries over S states, visibility decided by positions alone.

    q (B, Hkv, G, T, hd); keys (B, Hkv, S, hd); qpos (B, T); kpos (B, Hkv, S). all_visible: the caller knows every
    state is visible to every query (one query, no empty slot, no window). Returns fp32 (B, Hkv, G, T, S).
    """
    B, Hkv, G, T, hd = q.shape
    S = keys.shape[2]
    scores = q.reshape(B, Hkv, G * T, hd) @ keys.transpose(-1, -2)  # (B, Hkv, G*T, S): no repeat_kv copy
    scores = scores.view(B, Hkv, G, T, S) * (1.0 / math.sqrt(hd))
    if not all_visible:
        age = qpos[:, None, :, None] - kpos[:, :, None, :]  # (B, Hkv, T, S) how far back each state lies
        visible = (kpos[:, :, None, :] != EMPTY) & (age >= 0)  # causal: a query sees itself and the past
        if window is not None:
            visible &= age < window  # Mistral: 0 <= i - j < sliding_window
        scores = scores.masked_fill(~visible[:, :, None], torch.finfo(scores.dtype).min)
    return F.softmax(scores, dim=-1, dtype=torch.float32)  # (B, Hkv, G, T, S) fp32 as in transformers


def as_tokens(tokens, device) -> torch.Tensor:
    """`tokens` (a tensor or nested lists of ids) as a tensor on `device`: text, floats or an empty batch are
    refused here, with a message that says what to pass, instead of failing deep inside torch."""
    try:
        t = torch.as_tensor(tokens, device=device)
    except (TypeError, ValueError, RuntimeError) as e:  # ['a'], ragged lists, objects
        raise InputError(f"tokens must be integer token ids (a tensor or lists of ints), got {str(tokens)[:60]}; "
                         "encode text with the tokenizer first (tokenizer.encode(text)).") from e
    if t.is_floating_point() or t.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise InputError(f"tokens must be integer ids, got dtype {t.dtype}.")
    if t.dim() and t.shape[0] == 0:
        raise InputError("tokens is empty (a batch of 0 rows): give at least one row of token ids.")
    return t


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        # The table is made empty and initialised here only off the meta device: loading builds the model on "meta"
        # and assigns the weights, and on torch 2.13 a random init on meta imports torch._dynamo (1.2 s of load time)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        if not self.embed.weight.is_meta:
            nn.init.normal_(self.embed.weight)  # what nn.Embedding itself does
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.identity = ""  # where the weights came from (checked when a saved state is loaded)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def init_state(self, batch_size: int = 1, policy: Policy | None = None) -> State:
        """An empty multi-state for `batch_size` rows, with room for the policy's budget + the incoming token."""
        cfg = self.cfg
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
        states = getattr(policy, "states", None)
        # k + the incoming token + a spare slot; a budget beyond the trained context starts there and grows as needed
        capacity = [min(k, cfg.max_position_embeddings) + 2 if k is not None else 64
                    for k in layer_budgets(policy, cfg.num_hidden_layers)]  # per layer: PyramidKV's differ
        meta = {"model": self.identity, "policy": getattr(policy, "name", "full"), "states": states}
        rope_at_use = rotates_at_use(getattr(policy, "positions", "absolute"))
        return State.empty(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.head_dim, capacity,
                           self.dtype, rope_at_use=rope_at_use, meta=meta, device=self.embed.weight.device)

    # --- the one loop -------------------------------------------------------------------------------------------
    def _advance(self, tokens: torch.Tensor, state: State, policy: Policy | None, each_token: bool = True):
        """Feed T new tokens per row through every layer, updating `state`; returns final hidden (B, T, d).

        Layer-major: each layer takes all T tokens before the next layer starts (see `scan` for why a bounded
        policy still evicts after every token). each_token=False evicts once per layer, after the T tokens."""
        self._check(tokens, state, policy)
        B, T = tokens.shape
        scheme = getattr(policy, "positions", "absolute")
        if "rebase" in ((scheme,) if isinstance(scheme, str) else scheme):
            split = self._rebase(state, scheme, T)
            if split:  # a rebase row reaches the trained context inside these tokens: renumber it right there
                first = self._advance(tokens[:, :split], state, policy, each_token)
                return torch.cat([first, self._advance(tokens[:, split:], state, policy, each_token)], dim=1)
        pos = state.next_pos[:, None] + torch.arange(T, device=tokens.device)  # (B, T) absolute positions
        cfg = self.cfg
        if policy is not None and policy.states is not None and each_token:
            seq_len = pos.amax(dim=0) + 1  # (T,) token by token, as the recurrence would rotate each one
        else:
            seq_len = int(pos.max()) + 1  # dynamic RoPE scales by the length of the forward call (transformers)
        inv_freq = inv_frequencies(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, seq_len)  # (hd/2,) | (T, hd/2)
        inv_freq = inv_freq.to(tokens.device)
        cos, sin = cos_sin(pos, inv_freq, self.dtype)  # (B, T, hd)
        x = self.embed(tokens)  # (B, T, d)
        layers = len(self.layers)
        for i, (block, layer_state) in enumerate(zip(self.layers, state.layers)):
            layer_policy = policy.at_layer(i, layers) if policy is not None else None  # its own budget (PyramidKV)
            x = block(x, layer_state, pos, (inv_freq, cos, sin), layer_policy, each_token)
        state.next_pos = state.next_pos + T
        return self.norm(x)

    def _rebase(self, state: State, scheme, T: int) -> int:
        """The `rebase` position scheme: when a row of that scheme reaches the trained context (its next position
        is max_position_embeddings), renumber the states each layer holds 0, 1, ..., n-1 in position order (what
        `shift` does at every step) and continue the row's stream from the largest n. Cached keys are turned by
        the difference, R(new - old) R(old) k = R(new) k, so between two rebases a row runs exactly as with
        absolute positions, at the cost of one rotation of the state every few thousand tokens, and no query
        ever meets a key further back than the trained context (unless the budget itself is that large).
        Positions are rewritten: whatever reads them later (policies, the retention trace) sees the new ones.
        Returns how many of the T new tokens to feed before a row reaches the limit (0: none does), so that the
        caller splits there: where a rebase happens never depends on how the stream was cut into calls."""
        per_row = [scheme] * state.batch_size if isinstance(scheme, str) else list(scheme)
        limit = self.cfg.max_position_embeddings
        rows = torch.tensor([s == "rebase" for s in per_row], device=state.next_pos.device)
        ahead = limit - state.next_pos[rows]  # (R,) tokens each rebase row may still take
        inside = ahead[(ahead > 0) & (ahead < T)]
        if len(inside):
            return int(inside.min())
        rows &= state.next_pos >= limit  # (B,) rows at the trained context
        if not bool(rows.any()):
            return 0
        inv_freq = inv_frequencies(self.cfg.rope, self.cfg.head_dim, limit).to(state.next_pos.device)  # unscaled
        top = torch.full_like(state.next_pos[rows], -1)  # (R,) the largest new position in any layer
        for layer in state.layers:
            n = layer.size
            old = layer.pos[rows, :, :n]  # (R, Hkv, n)
            held = old != EMPTY
            new = effective_positions(old, "shift").long().masked_fill(~held, EMPTY)  # (R, Hkv, n) ranks 0..
            if not state.rope_at_use:  # keys were rotated at `old`: turn them on to `new`
                c, s = cos_sin((new - old).masked_fill(~held, 0), inv_freq, layer.keys.dtype)  # (R, Hkv, n, hd)
                layer.keys[rows, :, :n] = rotate(layer.keys[rows, :, :n], c, s)
            layer.pos[rows, :, :n] = new
            top = torch.maximum(top, new.flatten(1).amax(dim=1))
        state.next_pos[rows] = top + 1
        return 0

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:  # tied: the embedding matrix (int weights keep an int copy in lm_head instead)
            return F.linear(h, self.embed.weight).float()  # (..., vocab)
        return self.lm_head(h).float()

    # --- public API ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The reference: the ordinary causal transformer over tokens (B, T) -> logits (B, T, vocab), fp32."""
        tokens = as_tokens(tokens, self.embed.weight.device)  # on the model's device
        state = self.init_state(tokens.shape[0])
        return self._logits(self._advance(tokens, state, None))

    @torch.inference_mode()
    def step(self, tokens, state: State | None = None, policy: Policy | None = None):
        """One step of the recurrence: tokens (B,) -> (logits (B, vocab) fp32, state).

        The state is updated in place and returned (fork() it first to keep the old one). None starts a new one.
        """
        tokens = as_tokens(tokens, self.embed.weight.device)  # on the model's device
        if tokens.dim() != 1:
            raise InputError(f"step takes one token per batch row, shape (B,); got shape {tuple(tokens.shape)}. "
                             "Use prefill() for a prompt.")
        if state is None:
            state = self.init_state(tokens.shape[0], policy)
        h = self._advance(tokens[:, None], state, policy)  # (B, 1, d)
        return self._logits(h[:, 0]), state

    @torch.inference_mode()
    def prefill(self, tokens, state: State | None = None, policy: Policy | None = None, mode: str = "exact",
                all_logits: bool = False, chunk: int = 256, progress=None):
        """Consume a prompt tokens (B, T). Returns (logits, state): logits of the last token (B, vocab), or of every
        token (B, T, vocab) with all_logits=True.

        mode="exact": the prompt is run as the recurrence, with eviction after every token (the paper's Algorithm
        1), `chunk` tokens at a time layer-major (see `scan`): the same arithmetic as stepping each token, with each
        layer's weights read once per chunk. A policy that is not layer_local is stepped token by token.
        mode="fast": one parallel call over the whole prompt, then a single eviction down to k by the last query's
        attention (what the official TOVA code and kvpress do). Identical to "exact" when nothing is evicted.
        progress: called with the number of tokens after each chunk (a progress bar's update).
        """
        tokens = as_tokens(tokens, self.embed.weight.device)  # on the model's device
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise InputError(f"prefill takes a prompt of shape (B, T) with T >= 1; got shape {tuple(tokens.shape)}.")
        if mode not in PREFILL_MODES:
            raise InputError(f"prefill mode {mode!r} is unknown; choose 'exact' or 'fast'.")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise InputError(f"chunk={chunk!r}: give a positive number of tokens per layer-major chunk.")
        if state is None:
            state = self.init_state(tokens.shape[0], policy)
        bounded = getattr(policy, "states", None) is not None
        if mode == "fast" or not bounded:
            chunk = tokens.shape[1]  # nothing is evicted inside the call: one parallel pass
        elif not policy.layer_local:
            chunk = 1  # the policy looks beyond its layer: token-major, the plain recurrence
        hidden = []
        for piece in tokens.split(chunk, dim=1):
            hidden.append(self._advance(piece, state, policy, each_token=mode == "exact"))
            if progress is not None:
                progress(piece.shape[1])
        if all_logits:
            return self._logits(torch.cat(hidden, dim=1)), state
        return self._logits(hidden[-1][:, -1]), state

    def _check(self, tokens: torch.Tensor, state: State, policy: Policy | None) -> None:
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError(f"tokens must be integer ids, got dtype {tokens.dtype}.")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.cfg.vocab_size)][0].item()
            raise InputError(f"token id {bad} is out of range for a vocabulary of {self.cfg.vocab_size} "
                             f"(valid ids: 0..{self.cfg.vocab_size - 1}); was the text encoded with this model's tokenizer?")
        if tokens.shape[0] != state.batch_size:
            raise InputError(f"{tokens.shape[0]} token rows for a state of batch size {state.batch_size}; "
                             f"make the state with model.init_state({tokens.shape[0]}).")
        if len(state.layers) != self.cfg.num_hidden_layers or state.layers[0].keys.shape[1:] != (
            self.cfg.num_key_value_heads, state.layers[0].capacity, self.cfg.head_dim
        ):
            raise InputError("this state was made by a model of another shape; make it with this model's init_state().")
        made_by = state.meta.get("model")
        if made_by and self.identity and made_by != self.identity:
            raise InputError(f"this state was made by the model {made_by!r}, not by this one ({self.identity!r}); "
                             "continue a state with the model that made it, or start a new one with model.init_state().")
        if state.layers[0].keys.dtype != self.dtype:
            raise InputError(f"this state holds {state.layers[0].keys.dtype} keys and values but the model runs in "
                             f"{self.dtype}; load the model with the dtype the state was made with (dtype=...).")
        if policy is not None and not isinstance(policy, Policy):
            raise InputError(f"policy must be a msrnn.policies.Policy (or None for unbounded), got {type(policy).__name__}; "
                             "build one with msrnn.policies.make_policy(name, states).")
        if state.rope_at_use != rotates_at_use(getattr(policy, "positions", "absolute")):
            raise InputError("this state caches keys for another position scheme than the policy's; make the state "
                             "with model.init_state(batch_size, policy) for the policy you step with.")
