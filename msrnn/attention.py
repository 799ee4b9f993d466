"""One layer's attention as the recurrence: the layer's multi-state takes the new (key, value) pairs, the new
queries attend over it, and the policy bounds it.

`attend` is the one entry point (`model.Block.forward` calls it between the projections; `msrnn.hf` calls it from
inside a transformers model). The recurrence itself takes one token at a time: append its (k, v), attend over every
state held, ask the policy, drop the lowest. Which path runs when, and the test that proves it computes that same
function (equal logits, the same states kept):

  attend_parallel  queries that cannot evict yet: all of them when unbounded, the first k - n of a bounded chunk,
                   and prefill="fast"'s one pass (then one eviction, by the last query)
                   tests/test_model_vs_transformers.py::test_logits_equal_transformers
                   tests/test_model.py::test_prefill_exact_and_fast_equal_the_parallel_forward_when_unbounded
                   tests/test_policies.py::test_fast_prefill_is_one_eviction_by_the_last_query
  scan             the rest of a bounded chunk (T > 1, exact prefill): token by token, over projections that ran
                   layer-major          tests/test_scan.py::test_layer_major_equals_token_major
  one_query        a decode step (T = 1) of an unbounded layer: append, attend (ring_step's first half)
                   tests/test_model_vs_transformers.py::test_logits_equal_transformers (stepped, windows too)
  ring_step        a decode step (T = 1) of a bounded layer that holds exactly its k states: one slot rewritten
                   tests/test_scan.py::test_a_full_layer_steps_by_replacing_one_slot_exactly_as_the_general_path_does
  compiled step    model.compile(): a one-token step through torch.compile; all layers as one graph once each
                   holds its k states (ring_step), else (unbounded, filling up) each layer's call alone
                   tests/test_scan.py::test_a_compiled_step_equals_the_eager_one
                   tests/test_scan.py::test_the_whole_compiled_step_is_one_graph_per_token_and_equals_the_eager_one
  fused_attention  fused=True (msrnn.hf) with a policy that reads no probabilities (window, sinks, keydiff...)
                   tests/test_hf.py::test_every_policy_equals_msrnn
                   tests/test_hf.py::test_policies_without_attention_never_materialise_probabilities
  long_output      an unbounded pass past PARALLEL_PROBS probabilities (a long prompt): torch's causal kernel, or
                   the softmax in blocks of queries
                   tests/test_scan.py::test_a_long_unbounded_pass_is_the_same_function_in_bounded_memory
  valid (padding)  msrnn.hf with an attention mask: a padding token never enters the state, scores or evicts
                   tests/test_hf.py::test_ragged_batch_rows_equal_each_row_alone

Shapes: B batch rows, T new tokens, H query heads, Hkv kv heads, G = H / Hkv query heads per kv head, hd head dim,
S states held by the layer after adding the new ones (n + T).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .policies import Policy, check_priority, check_score, nan_error
from .rope import cos_sin, effective_positions, rotate, rotates_at_use
from .state import EMPTY, INF


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
    elif T == 1 and each_token and not rotates_at_use(scheme):  # the decode steps, in fewer operations
        if not bounded and not fused:  # the full cache's step: nothing leaves
            out = one_query(q, k, v, layer_state, pos, window)[1]  # (B, Hkv, G, hd)
            if layer_state.trace is not None:
                layer_state.trace(pos[:, 0], layer_state.pos[:, :, : layer_state.size])
            return out.view(B, 1, H * hd)
        if bounded and layer_state.holds_exactly(policy):
            return ring_step(q, k, v, layer_state, pos, policy, window, inv_freq)
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
    elif not bounded and valid is None and first == T and B * H * T * S > PARALLEL_PROBS:  # a long unbounded pass
        probs, out = None, long_output(q, v, layer_state, pos, scheme, inv_freq, window)
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
        queries = q[:, :, :, -1].reshape(B, H, hd) if policy.needs_queries else None  # (B, H, hd) the last query
        prio = ask(policy, last, kpos, layer_state.score[:, :, :S], layer_state, S, queries, rope_at(inv_freq, -1))
        layer_state.keep_top(check_priority(policy, prio, kpos, nan=True), policy.budget())
    if layer_state.trace is not None and first:  # what the layer holds after the parallel part's last token
        layer_state.trace(pos[:, first - 1], layer_state.pos[:, :, : n0 + first])
    if first < T:  # the recurrence: attend, then evict, one token at a time
        inv_scan = inv_freq[first:] if inv_freq is not None and inv_freq.dim() == 2 else inv_freq
        rest = scan(q[:, :, :, first:], layer_state, n0 + first, policy, scheme, inv_scan, window,
                    None if valid is None else valid[:, first:])
        if out is None:
            probs = torch.cat([probs, rest], dim=3) if first else rest  # (B, Hkv, G, T, S)
        else:  # fused parallel part: the recurrence's part gets its own product
            out = torch.cat([out.view(B, Hkv, G, first, hd), rest.to(v.dtype) @ layer_state.values[:, :, None, :S]], 3)
    if out is None:
        out = probs.to(v.dtype).view(B, Hkv, -1, S) @ layer_state.values[:, :, :S]  # (B, Hkv, G*T, hd)
    if bounded:
        layer_state.compact()  # evicted slots go to the newest survivors: the layer holds <= k slots again
    return out.view(B, Hkv, G, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, H * hd)  # (B, T, H*hd)


def ring_step(q, k, v, layer_state, pos, policy: Policy, window, inv_freq=None) -> torch.Tensor:
    """One token through a layer that holds exactly its k states: the recurrence's steady state, as one write.

    The newest state enters the spare slot, its query attends over the k + 1 states, and the state of lowest
    priority gives its slot to the newest (mistral-inference's ring buffer, `pos % window`, generalised to any
    policy). Same arithmetic as `scan` with T = 1, without the bookkeeping a chunk or a ragged batch needs.
    inv_freq: the RoPE frequencies, for a policy that needs_queries."""
    B, Hkv, G, _, hd = q.shape
    probs, out = one_query(q, k, v, layer_state, pos, window)  # k -> k + 1 candidates, the newest in the last slot
    S = layer_state.size
    kpos, score = layer_state.pos[:, :, :S], layer_state.score[:, :, :S]  # (B, Hkv, S) views
    attn = probs.view(B, Hkv * G, S) if policy.needs_attention or policy.keeps_score else None  # (B, H, S)
    if policy.keeps_score:
        score.copy_(update_score(policy, score, attn[:, :, None]))
    queries = q.view(B, Hkv * G, hd) if policy.needs_queries else None  # (B, H, hd)
    prio = ask(policy, attn, kpos, score, layer_state, S, queries, rope_at(inv_freq, 0))  # (B, 1 or Hkv, S)
    prio = check_priority(policy, prio, kpos)  # its shape and dtype; NaN is checked once per step, after the last
    layer_state.unranked = layer_state.replace_lowest(prio)  # NaN: checked once a step after the last layer
    if layer_state.trace is not None:
        layer_state.trace(pos[:, 0], layer_state.pos[:, :, : S - 1])
    return out.view(B, Hkv * G * hd)[:, None]  # (B, 1, H*hd)


def one_query(q, k, v, layer_state, pos, window):
    """One token's state enters the layer (the last slot in use) and its query attends over the n + 1 states held:
    (probs (B, Hkv, G, 1, S) fp32, out (B, Hkv, G, hd)). The whole decode step of an unbounded layer; ring_step's
    first half. q (B, Hkv, G, 1, hd), k, v (B, Hkv, 1, hd), pos (B, 1)."""
    B, Hkv, G, _, hd = q.shape
    layer_state.append(k, v, pos)  # n -> n + 1 states
    S = layer_state.size
    probs = attention_probs(q, layer_state.keys[:, :, :S], pos, layer_state.pos[:, :, :S], window,
                            all_visible=window is None and not layer_state.maybe_empty)  # holes: budgets per head
    out = probs.view(B, Hkv, G, S).to(v.dtype) @ layer_state.values[:, :, :S]  # (B, Hkv, G, hd), before a slot is reused
    return probs, out


def check_unranked(layer_states, policy_of) -> None:
    """Raise for NaN priorities that `ring_step` recorded in any of these layers (one host sync for all of them);
    policy_of(i) is layer i's policy, to name it."""
    pending = [(i, layer.unranked.flatten(1)) for i, layer in enumerate(layer_states) if layer.unranked is not None]
    for layer in layer_states:
        layer.unranked = None
    if pending and bool(torch.cat([low for _, low in pending], 1).isnan().any()):  # (B, layers x Hkv)
        i, low = next((i, low) for i, low in pending if bool(low.isnan().any()))
        raise nan_error(policy_of(i), int(low.isnan().any(1).nonzero()[0]))


def ask(policy: Policy, attn, pos, score, layer_state, S: int, queries=None, inv_freq=None):
    """policy.priority(attn, pos, score), and the layer's keys and/or values (B, Hkv, S, hd) for a policy that asks
    for them (needs_keys: KeyDiff; needs_values), or the values' norms (B, Hkv, S) that the state keeps
    (needs_value_norms: tova-value), or the newest query (B, H, hd) and the RoPE frequencies (hd/2,) (needs_queries:
    expected-attention), or each state's surprise (B, Hkv, S) (needs_surprise). Slots do not move inside a scan: one view serves."""
    extra = {"keys": layer_state.keys[:, :, :S]} if policy.needs_keys else {}
    if policy.needs_queries:
        extra["queries"], extra["inv_freq"] = queries, inv_freq
    if policy.needs_values:
        extra["values"] = layer_state.values[:, :, :S]
    if policy.needs_value_norms:
        extra["value_norms"] = layer_state.value_norms()[:, :, :S]
    if policy.needs_surprise:  # +inf for the states the current call fed (known after it: msrnn/surprise.py)
        extra["surprise"] = layer_state.surprises()[:, :, :S]
    return policy.priority(attn, pos, score, **extra)


def rope_at(inv_freq, t: int):
    """The RoPE frequencies (hd/2,) of query t: inv_freq is (hd/2,), or (T, hd/2) with one row per query (dynamic
    scaling stepped token by token), or None (msrnn.hf without a policy that needs_queries)."""
    return inv_freq[t] if inv_freq is not None and inv_freq.dim() == 2 else inv_freq


def update_score(policy: Policy, score, attn, valid=None):
    """policy.update over T queries attn (B, H, T, n); with valid (B, T), a padding query leaves its row's score as
    it was (a zero attention is not neutral for every update: a moving average would decay). What the policy
    returns must have the score's shape and dtype (check_score: shapes only, no host sync)."""
    if valid is None:
        return check_score(policy, policy.update(score, attn), score)
    for t in range(attn.shape[2]):
        new = check_score(policy, policy.update(score, attn[:, :, t : t + 1]), score)
        score = torch.where(valid[:, t, None, None], new, score)
    return score


# Most attention probabilities (B x H x queries x states) the unbounded parallel pass materialises: 2^26 fp32 =
# 256 MiB. Up to it (1,024 tokens x 5 rows, 2,048 x 1) the pass is the reference arithmetic (transformers' eager
# softmax); past it, a 4,096-token prompt would hold 0.6 GiB per layer (8,192: 2.4 GiB), several times over in the
# softmax's temporaries, and spend most of its time there (19 s a layer at 4,096 on one loaded core).
PARALLEL_PROBS = 2**26


def long_output(q, v, layer_state, pos, scheme, inv_freq, window) -> torch.Tensor:
    """The output (B, Hkv, G, T, hd) of T queries over the layer's S states when none is evicted and the
    probabilities are not wanted, for passes past PARALLEL_PROBS. A fresh prompt (the layer held nothing before:
    slot i holds the row's i-th token, no window) is the causal triangle: torch's fused kernel, O(T) memory and
    10x faster at 4,096 tokens (it agrees with the softmax to ~1e-6). Anything else (a state continued, a window)
    is the same softmax in blocks of queries that fit in PARALLEL_PROBS: each query's row is whole in one block."""
    B, Hkv, G, T, hd = q.shape
    S = layer_state.size
    keys, values = layer_state.keys[:, :, :S], layer_state.values[:, :, :S]  # (B, Hkv, S, hd)
    if S == T and window is None and not layer_state.maybe_empty and not rotates_at_use(scheme):
        out = F.scaled_dot_product_attention(q.reshape(B, Hkv * G, T, hd), keys, values, is_causal=True,
                                             enable_gqa=True)  # (B, H, T, hd): query head h reads kv head h // G
        return out.view(B, Hkv, G, T, hd)
    rows = max(1, PARALLEL_PROBS // (B * Hkv * G * S))  # queries per block
    blocks = []
    for a in range(0, T, rows):
        probs = attend_parallel(q[:, :, :, a : a + rows], layer_state, pos[:, a : a + rows], scheme, inv_freq,
                                S - T + a, window)  # (B, Hkv, G, t, S), t <= rows
        out = probs.to(v.dtype).view(B, Hkv, -1, S) @ values  # (B, Hkv, G*t, hd)
        blocks.append(out.view(B, Hkv, G, -1, hd))
    return torch.cat(blocks, dim=3)  # (B, Hkv, G, T, hd)


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
    too_old = None  # step-major ((T, ...) first): what step t reads is contiguous
    if window is not None:  # Mistral: a state further back than the window is invisible (not evicted)
        too_old = (qpos.T[:, :, None, None] - true_pos[None]) >= window  # (T, B, Hkv, S)
    scores = None
    if not rotates_at_use(scheme):  # keys do not move: all T queries against all S slots at once
        scores = (q.reshape(B, Hkv, G * T, hd) @ layer_state.keys[:, :, :S].transpose(-1, -2)).view(B, Hkv, G, T, S)
        scores = scores.mul_(1.0 / math.sqrt(hd))  # step t reads scores[:, :, :, t]: rows of S, no reordering copy
    # fp32 probabilities in the layout the output's product reads; step t writes its own over its scores (in fp32)
    fp32 = scores is not None and scores.dtype == torch.float32
    probs = scores if fp32 else torch.empty(B, Hkv, G, T, S, device=q.device)
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
            row = scores[:, :, :, t]  # (B, Hkv, G, S) a view, free to overwrite: only step t reads it
        mask = hidden if too_old is None else hidden | too_old[t]
        p = F.softmax(row.masked_fill_(mask[:, :, None], lowest), dim=-1, dtype=torch.float32)  # (B, Hkv, G, S)
        if valid is not None:
            p = p * valid[:, t, None, None, None]  # a padding query attends to nothing
        probs.select(3, t).copy_(p)
        attn = p.view(B, Hkv * G, S) if needs_attn else None  # (B, H, S) query head h = kv head h // G
        if policy.keeps_score:
            score.copy_(update_score(policy, score, attn[:, :, None], None if valid is None else valid[:, t : t + 1]))
        queries = (qt if scores is None else q[:, :, :, t]).reshape(B, Hkv * G, hd) if policy.needs_queries else None
        prio = ask(policy, attn, pos, score, layer_state, S, queries, rope_at(inv_freq, t))  # (B, 1 or Hkv, S)
        prio = check_priority(policy, prio, pos, nan=t == T - 1)  # NaN: once a chunk
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
    return probs  # (B, Hkv, G, T, S)


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
