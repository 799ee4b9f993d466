"""expected-attention (kvpress's ExpectedAttentionPress as a recurrence): the newest query turned by the mean RoPE
rotation of the next n positions, softmax over the held keys, the group's mean, times ||v||_2, sinks pinned.

By hand on a 2-dim head; against an independent fp64 computation with explicit rotation matrices; equal to the
reference (msrnn/reference.py) token by token and layer-major on tiny Llama and Mistral models, with budgets per
layer and per kv head, dynamic RoPE and rebase; in RowPolicies beside other policies; through msrnn.hf; and the
position schemes and settings it refuses."""
import math
import tempfile

import pytest
import torch

import msrnn
from msrnn.batch import RowPolicies
from msrnn.errors import InputError
from msrnn.policies import INF, POLICIES, ExpectedAttention, make_policy
from msrnn.reference import rms_norm
from msrnn.rope import cos_sin, inv_frequencies, rotate
from test_reference import held, side_by_side, tiny
from tiny import hf_model, save

TOKENS = torch.randint(0, 61, (14,), generator=torch.Generator().manual_seed(5)).tolist()


def test_by_hand_on_a_two_dimensional_head():
    """hd = 2, one pair turning by w = pi/2 a position, n = 2 future positions: R_1 turns by 90 degrees, R_2 by 180,
    so their mean is c = (cos 90 + cos 180)/2 = -1/2, s = (sin 90 + sin 180)/2 = 1/2, and q = (1, 0) becomes
    qbar = q c + (-q_1, q_0) s = (-1/2, 1/2)."""
    p = ExpectedAttention(2, future=2, sinks=0)
    assert POLICIES["expected-attention"] is ExpectedAttention
    q = torch.tensor([[[1.0, 0.0]]])  # (B=1, H=1, hd=2)
    inv_freq = torch.tensor([math.pi / 2])
    torch.testing.assert_close(p.future_query(q, inv_freq), torch.tensor([[[-0.5, 0.5]]], dtype=torch.float64))
    keys = torch.tensor([[[[-1.0, 1.0], [1.0, -1.0], [2.0, 0.0], [5.0, 5.0]]]])  # qbar.k = 1, -1, -1, 0
    values = torch.tensor([[[[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]]])  # ||v|| = 5, 1, 2, (empty slot)
    pos = torch.tensor([[[0, 1, 2, -1]]])
    e = [math.exp(x / math.sqrt(2)) for x in (1, -1, -1)]  # the empty slot takes no share of the softmax
    expected = torch.tensor([[[e[0] / sum(e) * 5, e[1] / sum(e) * 1, e[2] / sum(e) * 2]]])
    prio = p.priority(None, pos, torch.zeros(1, 1, 4), keys=keys, values=values, queries=q, inv_freq=inv_freq)
    torch.testing.assert_close(prio[..., :3], expected)
    eps = ExpectedAttention(2, future=2, sinks=1, epsilon=0.5)  # (a + epsilon) ||v||, and the first token pinned
    prio = eps.priority(None, pos, torch.zeros(1, 1, 4), keys=keys, values=values, queries=q, inv_freq=inv_freq)
    assert prio[0, 0, 0] == INF
    torch.testing.assert_close(prio[0, 0, 1:3], (expected[0, 0, 1:] + torch.tensor([0.5, 1.0])))


def test_equals_an_independent_fp64_computation_with_rotation_matrices():
    """B = 2 rows, Hkv = 2 kv heads of G = 2 query heads, hd = 6: the mean of the n rotation matrices R_i (block
    rotations of each pair (x_f, x_{f+hd/2}) by i w_f) applied to each query, then as the docstring says."""
    g = torch.Generator().manual_seed(0)
    B, Hkv, G, n, hd, future = 2, 2, 2, 7, 6, 5
    q, keys = torch.randn(B, Hkv * G, hd, generator=g), torch.randn(B, Hkv, n, hd, generator=g)
    values = torch.randn(B, Hkv, n, hd, generator=g)
    pos = torch.tensor([3, 0, 6, 1, 5, 2, 4]).expand(B, Hkv, n).clone()
    pos[1, 0, 2] = -1  # an empty slot in row 1, kv head 0
    inv_freq = torch.tensor([1.0, 0.3, 0.01])
    R = torch.zeros(hd, hd, dtype=torch.float64)
    for i in range(1, future + 1):
        for f, w in enumerate(inv_freq.double().tolist()):
            a, b = f, f + hd // 2
            R[a, a] += math.cos(i * w) / future
            R[b, b] += math.cos(i * w) / future
            R[a, b] -= math.sin(i * w) / future  # x_a' = x_a cos - x_b sin
            R[b, a] += math.sin(i * w) / future  # x_b' = x_b cos + x_a sin
    expected = torch.empty(B, Hkv, n, dtype=torch.float64)
    for r in range(B):
        for h in range(Hkv):
            share = torch.zeros(n, dtype=torch.float64)
            for j in range(G):
                qbar = R @ q[r, h * G + j].double()
                logits = keys[r, h].double() @ qbar / math.sqrt(hd)
                logits[pos[r, h] == -1] = -math.inf
                share += logits.softmax(0) / G
            expected[r, h] = (share + 0.1) * values[r, h].double().norm(dim=-1)
    expected = expected.float().masked_fill(pos < 2, INF)
    p = ExpectedAttention(4, future=future, sinks=2, epsilon=0.1)
    prio = p.priority(None, pos, torch.zeros(B, Hkv, n), keys=keys, values=values, queries=q, inv_freq=inv_freq)
    torch.testing.assert_close(prio, expected)


@pytest.mark.parametrize("model_kw", [{}, {"model_type": "mistral", "window": 4, "seed": 1},
                                      {"rope": "dynamic", "max_pos": 8, "seed": 2}])
def test_equals_the_reference_token_by_token_and_layer_major(model_kw):
    """side_by_side: model.step (ring_step once a layer is full) and model.prefill (the layer-major scan, chunks
    of 5) against the reference: logits <= 1e-5 and the same positions kept, after every token."""
    model = tiny(**model_kw)
    for spec, k in [("expected-attention", 5), ("expected-attention", 8), ("expected-attention", 15),
                    ("expected-attention(sinks=0, future=3)", 1), ("expected-attention(sinks=1, epsilon=0.01)", 3)]:
        side_by_side(model, TOKENS, make_policy(spec, k), chunk=5)


def test_budgets_per_layer_and_per_kv_head_and_rebase_equal_the_reference():
    side_by_side(tiny(layers=3), TOKENS, make_policy("expected-attention", [9, 5, 6]), chunk=4)
    side_by_side(tiny(kv=2), TOKENS, make_policy("expected-attention", [[5, 8], [7, 5]]), chunk=4)
    side_by_side(tiny(kv=2, groups=3, max_pos=8), TOKENS,
                 make_policy("expected-attention(sinks=1)", [[2, 4], [3, 2]], positions="rebase"), chunk=3)


def test_rows_of_a_batch_decide_as_each_policy_alone():
    """RowPolicies: expected-attention rows (one with budgets per kv head) beside TOVA and KeyDiff rows, stepped
    and prefilled layer-major, each row equal to its policy run alone."""
    model = tiny(kv=2)
    members = [make_policy("expected-attention", 6), make_policy("tova", 5),
               make_policy("expected-attention", [[5, 7], [6, 5]]), make_policy("keydiff", 6)]
    rows = RowPolicies(members, rows=1)
    assert rows.needs_queries and rows.needs_keys and rows.needs_values
    ids = torch.tensor([TOKENS] * len(members))
    batch_logits, batch_state = model.prefill(ids[:, :9], None, rows, all_logits=True, chunk=4)
    steps = [model.step(ids[:, t], batch_state, rows)[0] for t in range(9, ids.shape[1])]
    batch_logits = torch.cat([batch_logits, torch.stack(steps, dim=1)], dim=1)
    for r, m in enumerate(members):
        alone, state = model.prefill(ids[r : r + 1, :9], None, m, all_logits=True, chunk=4)
        more = [model.step(ids[r : r + 1, t], state, m)[0] for t in range(9, ids.shape[1])]
        alone = torch.cat([alone, torch.stack(more, dim=1)], dim=1)
        assert (batch_logits[r] - alone[0]).abs().max() <= 1e-5, r
        assert [[sorted(x) for x in layer] for layer in held_row(batch_state, r)] == \
               [[sorted(x) for x in layer] for layer in held(state)], r


def held_row(state, r):
    return [[{p for p in layer.pos[r, h, : layer.size].tolist() if p != -1} for h in range(layer.pos.shape[1])]
            for layer in state.layers]


def test_fast_prefill_evicts_by_the_last_query():
    """prefill="fast": one parallel pass, then one eviction scored by the prompt's last query (as kvpress scores a
    prompt once at its end): the same as asking the policy with that query by hand."""
    model = tiny()
    ids = torch.tensor([TOKENS])
    policy = make_policy("expected-attention", 6)
    _, state = model.prefill(ids, None, policy, mode="fast")
    assert all(layer.size == 6 for layer in state.layers)
    _, full = model.prefill(ids, None, None, mode="fast")
    block = model.layers[0]  # layer 0's query of the last token, as its attention saw it (rotated)
    h = rms_norm(model.embed.weight[TOKENS[-1]], block.attn_norm)
    cfg = model.cfg
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qh = block.qkv(h).view(H + 2 * Hkv, hd)[:H]
    inv_freq = inv_frequencies(cfg.rope, hd, cfg.max_position_embeddings, len(TOKENS))
    c, s = cos_sin(torch.tensor(len(TOKENS) - 1), inv_freq, qh.dtype)
    q = rotate(qh, c, s)[None]  # (1, H, hd)
    layer = full.layers[0]
    n = layer.size
    prio = policy.priority(None, layer.pos[:, :, :n], layer.score[:, :, :n], keys=layer.keys[:, :, :n],
                           values=layer.values[:, :, :n], queries=q, inv_freq=inv_freq)
    top = prio.topk(6, dim=-1).indices  # no ties here
    expected = [sorted(layer.pos[0, h, top[0, h]].tolist()) for h in range(Hkv)]
    assert [sorted(x) for x in held(state)[0]] == expected


def test_through_msrnn_hf_equals_msrnn():
    """msrnn.hf.PolicyCache: a transformers Llama with the "msrnn" attention, a prompt in one call (evicting inside
    it) then token by token, gives msrnn's logits (the RoPE frequencies come from the module's config)."""
    hf_bridge = pytest.importorskip("msrnn.hf")
    hf = hf_model("llama", seed=3)
    with tempfile.TemporaryDirectory() as d:
        model = msrnn.load_model(save(hf, d))
    hf.set_attn_implementation(hf_bridge.ATTENTION)
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(6))
    policy = make_policy("expected-attention", 6)
    cache, out = hf_bridge.PolicyCache(policy), []
    with torch.no_grad():
        for a, b in [(0, 9), *((t, t + 1) for t in range(9, 14))]:
            out.append(hf(ids[:, a:b], position_ids=torch.arange(a, b).expand(2, -1), cache=cache).logits)
    logits, state = model.prefill(ids[:, :9], None, policy, all_logits=True)
    steps = [model.step(ids[:, t], state, policy)[0][:, None] for t in range(9, 14)]
    assert (torch.cat(out, 1) - torch.cat([logits, *steps], 1)).abs().max() <= 1e-5
    assert cache.sizes == [6, 6]


def test_refusals():
    for scheme in ("shift", "loglog"):
        with pytest.raises(InputError, match="rotates keys at every use"):
            make_policy("expected-attention", 64, positions=scheme)
    with pytest.raises(InputError, match="sink tokens leave no room"):
        make_policy("expected-attention", 4)
    with pytest.raises(InputError, match="future"):
        make_policy("expected-attention(future=0)", 64)
    with pytest.raises(InputError, match="epsilon"):
        make_policy("expected-attention(epsilon=-1)", 64)
    with pytest.raises(InputError, match="separate batches"):
        RowPolicies([make_policy("expected-attention", 8), make_policy("sinks", 8, positions="shift")], rows=1)
