"""Budgets per kv head (`PerHead`, `make_policy(name, [[k_00, k_01], ...])`): on tiny Llama/Mistral models every
built-in policy gives the same logits and keeps the same positions per kv head stepped token by token, scanned
layer-major and through RowPolicies; each kv head holds exactly its own budget; an independent oracle (transformers'
own projections, RoPE and MLP, with each kv head's states kept in a list of its own) gives the same logits; budgets
of the wrong shape are one clear error."""
import tempfile

import pytest
import torch
from hypothesis import given, settings, strategies as st

import msrnn
from msrnn.batch import RowPolicies
from msrnn.errors import InputError
from msrnn.policies import POLICIES, PerHead, PerLayer, TOVA, make_policy, parse_states
from tiny import POLICY_NAMES, hf_model, save

TOL = 1e-5  # fp32
HEAD_POLICIES = [n for n in POLICY_NAMES if n != "pyramidkv"] + ["sinks(sinks=1)"]  # pyramidkv sets its own budgets


@pytest.fixture(scope="module")
def models():
    out = {}
    for kind in ("llama", "mistral"):
        extra = {"sliding_window": 7} if kind == "mistral" else {}
        hf = hf_model(kind, seed=5, num_hidden_layers=3, num_key_value_heads=2, num_attention_heads=4, **extra)
        with tempfile.TemporaryDirectory() as d:
            out[kind] = (hf, msrnn.load_model(save(hf, d)))
    return out


def held(state) -> list[list[int]]:
    """The positions each (layer, row, kv head) holds, as sorted lists (slot order means nothing)."""
    return [sorted(layer.pos[b, h][layer.pos[b, h] >= 0].tolist()) for layer in state.layers
            for b in range(layer.pos.shape[0]) for h in range(layer.pos.shape[1])]


def _accepts(name, k) -> bool:
    try:
        return make_policy(name, k) is not None
    except InputError:
        return False


def stepped(model, x, policy):
    state, out = model.init_state(x.shape[0], policy), []
    for t in range(x.shape[1]):
        logits, state = model.step(x[:, t], state, policy)
        out.append(logits)
    return torch.stack(out, 1), state


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(HEAD_POLICIES), kind=st.sampled_from(["llama", "mistral"]),
       budgets=st.lists(st.lists(st.integers(1, 14), min_size=2, max_size=2), min_size=3, max_size=3),
       chunk=st.sampled_from([1, 5, 32]), seed=st.integers(0, 99))
def test_per_head_budgets_step_equals_scan(models, name, kind, budgets, chunk, seed):
    _, model = models[kind]
    floor = next(k for k in range(1, 8) if _accepts(name, k))  # the smallest budget the policy takes
    budgets = [[max(k, floor) for k in layer] for layer in budgets]
    policy = make_policy(name, budgets)
    x = torch.randint(0, 97, (2, 18), generator=torch.Generator().manual_seed(seed))
    scanned, state = model.prefill(x, policy=policy, all_logits=True, chunk=chunk)
    by_step, state2 = stepped(model, x, policy)
    assert (by_step - scanned).abs().max() <= TOL
    assert held(state) == held(state2)
    for layer, ks in zip(state2.layers, budgets):  # every kv head holds exactly its own budget (or all it saw)
        counts = (layer.pos >= 0).sum(-1)  # (B, Hkv)
        if name != "baseline":
            assert counts.tolist() == [[min(k, 18) for k in ks]] * 2


def test_per_head_rows_of_a_batch_equal_their_own_runs(models):
    """RowPolicies: rows of per-head budgets and rows of one budget in one batch, each as if alone."""
    _, model = models["llama"]
    members = [make_policy("tova", [[6, 2], [3, 5], [4, 4]]).at_layer(0, 3), TOVA(4)]
    per_layer = [make_policy("tova", [[6, 2], [3, 5], [4, 4]]), make_policy("h2o", [[2, 8], [4, 4], [6, 2]])]
    x = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    rows = RowPolicies(per_layer, rows=2)
    both, state = model.prefill(x, policy=rows, all_logits=True, chunk=4)
    for i, policy in enumerate(per_layer):
        alone, s = stepped(model, x[2 * i : 2 * i + 2], policy)
        assert (both[2 * i : 2 * i + 2] - alone).abs().max() <= TOL
        assert held(s) == [h for layer in state.layers for h in
                           [sorted(layer.pos[b, k][layer.pos[b, k] >= 0].tolist())
                            for b in range(2 * i, 2 * i + 2) for k in range(2)]]
    assert isinstance(members[0], PerHead) and members[0].heads == (6, 2)


def oracle(hf, x, keep):
    """transformers' own modules, token by token, each kv head with its own list of (position, key, value);
    keep(layer, head, positions, attn) -> the positions that head keeps after the step (attn: its query heads'
    attention over those positions, (G, n)). Returns logits (B=1, T, V)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m, cfg = hf.model, hf.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd, G = cfg.hidden_size // H, H // Hkv
    lists = [[[] for _ in range(Hkv)] for _ in m.layers]  # [layer][head] -> [(pos, k (hd,), v (hd,))]
    out = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            h = m.embed_tokens(x[:, t : t + 1])  # (1, 1, d)
            cos, sin = m.rotary_emb(h, torch.tensor([[t]]))
            for i, layer in enumerate(m.layers):
                a = layer.input_layernorm(h)
                att = layer.self_attn
                q = att.q_proj(a).view(1, 1, H, hd).transpose(1, 2)  # (1, H, 1, hd)
                k = att.k_proj(a).view(1, 1, Hkv, hd).transpose(1, 2)
                v = att.v_proj(a).view(1, 1, Hkv, hd).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                heads = []
                for j in range(Hkv):
                    lists[i][j].append((t, k[0, j, 0], v[0, j, 0]))
                    K = torch.stack([e[1] for e in lists[i][j]])  # (n, hd)
                    V = torch.stack([e[2] for e in lists[i][j]])
                    p = torch.softmax(q[0, j * G : (j + 1) * G, 0] @ K.T / hd**0.5, dim=-1)  # (G, n)
                    heads.append(p @ V)  # (G, hd)
                    kept = set(keep(i, j, [e[0] for e in lists[i][j]], p))
                    lists[i][j] = [e for e in lists[i][j] if e[0] in kept]
                h = h + att.o_proj(torch.cat(heads).reshape(1, 1, H * hd))
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            out.append(hf.lm_head(m.norm(h))[:, 0])
    return torch.stack(out, 1)


def test_per_head_budgets_equal_an_independent_oracle(models):
    """TOVA with budgets per kv head is TOVA decided by each kv head's own query heads: the oracle keeps, per head,
    the k_h positions of highest head-mean attention (ties: the newest stays; no ties happen with random weights)."""
    hf, model = models["llama"]
    budgets = [[5, 2], [3, 7], [1, 4]]
    x = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(2))

    def keep(i, j, positions, p):
        k = budgets[i][j]
        order = sorted(range(len(positions)), key=lambda n: (float(p.mean(0)[n]), positions[n]), reverse=True)
        return [positions[n] for n in order[:k]]

    expected = oracle(hf, x, keep)
    ours, _ = stepped(model, x, make_policy("tova", budgets))
    assert (ours - expected).abs().max() <= TOL
    window, _ = stepped(model, x, make_policy("window", budgets))  # and a position rule: the newest k_h
    assert (window - oracle(hf, x, lambda i, j, ps, p: ps[-budgets[i][j]:])).abs().max() <= TOL


def test_per_head_budgets_are_parsed_and_checked(models, tmp_path):
    _, model = models["llama"]
    assert parse_states("[[4,2],[3,3],[2,4]]") == [[4, 2], [3, 3], [2, 4]]
    f = tmp_path / "b.json"
    f.write_text('{"budgets": [[4, 2], [3, 3], [2, 4]]}')
    assert parse_states(str(f)) == [[4, 2], [3, 3], [2, 4]]
    p = make_policy("tova", parse_states(str(f)))
    assert isinstance(p, PerLayer) and p.states == [[4, 2], [3, 3], [2, 4]] and p.min_budget() == 2
    assert [layer.capacity for layer in model.init_state(1, p).layers] == [6, 5, 6]  # the largest head + 2
    with pytest.raises(InputError, match="3 budgets per kv head, but this model has 2"):
        model.step(torch.tensor([1]), None, make_policy("tova", [[4, 2, 1]] * 3))
    for bad in ("[[4,2],[3,x]]", "[[4,2.5]]", str(tmp_path / "none.json")):
        with pytest.raises(InputError, match="--states"):
            parse_states(bad)
    with pytest.raises(InputError, match=">= 2"):
        make_policy("h2o", [[4, 1]])
    with pytest.raises(InputError, match="per layer"):
        make_policy("pyramidkv", [[4, 4]])


def test_per_head_budgets_through_policy_cache_equal_msrnn(models, tmp_path):
    """msrnn.hf.PolicyCache keeps the same states per kv head as msrnn's own recurrence (retrieval too, with a
    calibration of this model)."""
    hf_bridge = pytest.importorskip("msrnn.hf")
    hf, model = models["llama"]
    hf.set_attn_implementation(hf_bridge.ATTENTION)
    cal = tmp_path / "cal.json"
    cal.write_text('{"layers": 3, "kv_heads": 2, "ranking": [[1, 1], [0, 0], [2, 0], [0, 1], [1, 0], [2, 1]]}')
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(6))
    for policy in (make_policy("tova", [[6, 2], [3, 5], [4, 4]]), make_policy("h2o", [[2, 8], [4, 4], [6, 2]]),
                   make_policy(f"retrieval(calibration={str(cal)!r}, ratio=2, stream=0.5, sinks=1)", 4)):
        ours, state = stepped(model, x, policy)
        cache = hf_bridge.PolicyCache(policy)
        with torch.no_grad():
            theirs = torch.cat([hf(x[:, t : t + 1], cache=cache).logits for t in range(16)], dim=1)
        assert (theirs - ours).abs().max() <= TOL
        for layer, mine in zip(cache.layers, state.layers):
            pos = layer.positions
            assert [[sorted(p for p in head.tolist() if p >= 0) for head in row] for row in pos] == \
                [[sorted(p for p in head.tolist() if p >= 0) for head in row] for row in mine.pos[:, :, : mine.size]]


def test_a_saved_per_head_state_continues_as_if_never_saved(models, tmp_path):
    _, model = models["llama"]
    policy = make_policy("tova-decay", [[6, 2], [3, 5], [4, 4]])
    x = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(7))
    _, state = model.prefill(x[:, :12], policy=policy)
    state.save(tmp_path / "s.safetensors")
    whole, _ = model.prefill(x[:, 12:], state, policy, all_logits=True)
    again, _ = model.prefill(x[:, 12:], msrnn.State.load(tmp_path / "s.safetensors"), policy, all_logits=True)
    assert (whole - again).abs().max() == 0


def test_a_full_layer_with_budgets_per_head_takes_the_one_slot_step(models, monkeypatch):
    """Once every kv head holds its own budget, a decode step writes one slot per head (attention.ring_step, the
    smaller heads' EMPTY holes masked and never chosen), with the logits and states of the general path."""
    import msrnn.attention as attention

    _, model = models["mistral"]
    policy = make_policy("tova", [[6, 2], [3, 5], [4, 4]])
    x = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(8))
    general, state = model.prefill(x, policy=policy, all_logits=True, chunk=24)  # the general path (a chunk)
    calls, ring = [], attention.ring_step
    monkeypatch.setattr(attention, "ring_step", lambda *a, **k: calls.append(1) or ring(*a, **k))
    by_step, state2 = stepped(model, x, policy)
    assert (by_step - general).abs().max() <= TOL and held(state2) == held(state)
    assert len(calls) >= 3 * (24 - 7)  # every layer, from soon after its largest budget is reached


def test_a_grid_takes_budgets_per_head_beside_the_others(tmp_path):
    from msrnn.grid import budget_label, mean_budget, parse_budgets

    f = tmp_path / "b.json"
    f.write_text('{"budgets": [[8, 4], [2, 2]]}')
    budgets = parse_budgets(f"64,[96,64,32],[[4,2],[3,3]],{f}")
    assert budgets == [((4, 2), (3, 3)), ((8, 4), (2, 2)), (96, 64, 32), 64]  # by mean: 3, 4, 64, 64
    assert [budget_label(k) for k in budgets[:2]] == ["heads~3", "heads~4"] and mean_budget(budgets[1]) == 4
    assert isinstance(make_policy("tova", list(budgets[0])).at_layer(1, 2), PerHead)
    with pytest.raises(InputError, match="per kv head"):
        parse_budgets("64,[[4,x]]")
