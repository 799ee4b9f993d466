"""Every policy's invariants, on hand-built tensors (no model) and on tiny models against transformers."""
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import msrnn
from msrnn.errors import InputError
from msrnn.policies import H2O, TOVA, Baseline, H2OLayer, Policy, Sinks, TOVAHead, Window, make_policy
from msrnn.state import LayerState
from tiny import hf_model, hf_scan, save

TOL = 1e-5
BOUNDED = ["window", "sinks", "tova", "tova-head", "h2o", "h2o-layer", "baseline"]


def layer_state(pos: torch.Tensor, hd: int = 2) -> LayerState:
    """A LayerState whose keys hold their own positions, so moves and drops can be followed by value."""
    B, Hkv, n = pos.shape
    keys = pos[..., None].float().expand(B, Hkv, n, hd).clone()
    return LayerState(keys, keys.clone() * 10, pos.clone(), torch.zeros(B, Hkv, n), size=n)


def tiny(model_type="llama", **cfg):
    hf = hf_model(model_type, **cfg)
    with tempfile.TemporaryDirectory() as d:
        return hf, msrnn.load_model(save(hf, d))


def scan(model, tokens, policy):
    state, out = model.init_state(tokens.shape[0], policy), []
    for t in range(tokens.shape[1]):
        logits, state = model.step(tokens[:, t], state, policy)
        out.append(logits)
    return torch.stack(out, dim=1), state


# --- hand-built attention ---------------------------------------------------------------------------------------
def test_tova_drops_the_argmin_of_the_head_mean():
    attn = torch.tensor([[[0.1, 0.5, 0.1, 0.3], [0.4, 0.1, 0.2, 0.3]]])  # (B=1, H=2, n=4); head-mean .25 .3 .15 .3
    pos = torch.tensor([[[0, 1, 2, 3]]])  # (B, Hkv=1, n)
    ls = layer_state(pos)
    ls.evict(TOVA(3).priority(attn, pos, ls.score), 3)
    assert sorted(ls.pos[0, 0, :3].tolist()) == [0, 1, 3]  # position 2 had the lowest mean attention
    assert ls.keys[0, 0, :3, 0].tolist() == ls.pos[0, 0, :3].float().tolist()  # keys moved with their positions


def test_tova_may_drop_the_newest_token():
    attn = torch.tensor([[[0.4, 0.3, 0.2, 0.1]]])
    pos = torch.tensor([[[0, 1, 2, 3]]])
    ls = layer_state(pos)
    ls.evict(TOVA(3).priority(attn, pos, ls.score), 3)
    assert sorted(ls.pos[0, 0, :3].tolist()) == [0, 1, 2]


def test_tova_head_decides_per_kv_head_and_rows_differ():
    # B=2, H=4 query heads over Hkv=2 kv heads (G=2), n=3 states.
    attn = torch.tensor([[[.6, .3, .1], [.6, .3, .1], [.1, .3, .6], [.1, .3, .6]],
                         [[.3, .1, .6], [.3, .1, .6], [.3, .1, .6], [.3, .1, .6]]])
    pos = torch.tensor([[0, 1, 2]]).expand(2, 2, 3).contiguous()
    ls = layer_state(pos)
    ls.evict(TOVAHead(2).priority(attn, pos, ls.score), 2)
    kept = [[sorted(ls.pos[b, h, :2].tolist()) for h in range(2)] for b in range(2)]
    assert kept == [[[0, 1], [1, 2]], [[0, 2], [0, 2]]]
    ls2 = layer_state(pos)
    ls2.evict(TOVA(2).priority(attn, pos, ls2.score), 2)  # layer-wise: head-mean is (.35,.3,.35) for row 0
    assert [sorted(ls2.pos[0, h, :2].tolist()) for h in range(2)] == [[0, 2], [0, 2]]


def test_h2o_accumulates_attention_by_hand():
    p = H2O(4)
    score = torch.zeros(1, 1, 3)
    a1 = torch.tensor([[[[.5, .3, .2]], [[.1, .1, .8]]]])  # (B=1, H=2, T=1, n=3), both heads on kv head 0
    a2 = torch.tensor([[[[.2, .2, .6]], [[.3, .3, .4]]]])
    score = p.update(p.update(score, a1), a2)
    assert torch.allclose(score, torch.tensor([[[1.1, 0.9, 2.0]]]))
    layer = H2OLayer(4)
    s = layer.update(torch.zeros(1, 2, 3), a1)  # layer-wise: summed over all heads, the same for each kv head
    assert torch.allclose(s, torch.tensor([[[.6, .4, 1.0], [.6, .4, 1.0]]]))


def test_h2o_keeps_the_recent_half_even_with_no_attention():
    pos = torch.arange(9)[None, None]  # 9 states, budget 8 -> recent 4: positions 5..8 are protected
    score = torch.tensor([[[9., 9, 9, 9, 9, 0, 0, 0, 0]]])
    prio = H2O(8).priority(None, pos, score)
    ls = layer_state(pos)
    ls.evict(prio, 8)
    assert set(range(5, 9)) <= set(ls.pos[0, 0, :8].tolist())


def test_sinks_and_window_priorities():
    pos = torch.tensor([[[7, 0, 5, 1, 6, 2, 3, 4]]])
    ls = layer_state(pos)
    ls.evict(Sinks(5, sinks=2).priority(None, pos, ls.score), 5)
    assert sorted(ls.pos[0, 0, :5].tolist()) == [0, 1, 5, 6, 7]
    ls = layer_state(pos)
    ls.evict(Window(3).priority(None, pos, ls.score), 3)
    assert sorted(ls.pos[0, 0, :3].tolist()) == [5, 6, 7]


def test_baseline_drops_everything_when_full():
    pos = torch.arange(5)[None, None]
    ls = layer_state(pos)
    ls.evict(Baseline(4).priority(None, pos, ls.score), 4)
    assert ls.size == 0


def test_invalid_budgets_are_clear_errors():
    for bad in (0, -3, 2.5, None, True):
        with pytest.raises(InputError, match="budget"):
            TOVA(bad)
    with pytest.raises(InputError, match="sink"):
        Sinks(4, sinks=4)
    with pytest.raises(InputError, match="budget"):
        H2O(1)
    with pytest.raises(InputError, match="unknown policy"):
        make_policy("lru", 8)
    with pytest.raises(InputError, match="needs a budget"):
        make_policy("tova")
    with pytest.raises(InputError, match="positions"):
        TOVA(8, positions="relative")


@settings(max_examples=200)
@given(st.data())
def test_no_duplicates_and_the_newest_survives_unless_it_scores_lowest(data):
    B, Hkv, G = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    k = data.draw(st.integers(5, 12))  # sinks needs k > 4 sink tokens
    name = data.draw(st.sampled_from(BOUNDED))
    policy = make_policy(name, k)
    # a state of k old positions (distinct, any order, per kv head) plus the newest at the last slot
    old = torch.stack([torch.stack([torch.randperm(3 * k)[:k].sort().values[torch.randperm(k)] for _ in range(Hkv)])
                       for _ in range(B)])
    pos = torch.cat([old, torch.full((B, Hkv, 1), 3 * k)], dim=-1)  # (B, Hkv, k+1), newest = 3k
    attn = torch.rand(B, Hkv * G, k + 1) ** data.draw(st.sampled_from([1, 4]))
    attn = attn / attn.sum(-1, keepdim=True)
    ls = layer_state(pos)
    ls.score[:] = torch.rand(B, Hkv, k + 1)
    prio = policy.priority(attn, pos, ls.score)
    ls.evict(prio, k)
    assert ls.size == (0 if name == "baseline" else k)
    for b in range(B):
        for h in range(Hkv):
            kept = ls.pos[b, h, : ls.size].tolist()
            assert len(kept) == len(set(kept))  # never a duplicate
            assert ls.keys[b, h, : ls.size, 0].tolist() == [float(p) for p in kept]  # keys travel with positions
            if name == "baseline":
                continue
            if 3 * k not in kept:  # the newest was dropped: only TOVA may do that, and only if it scored lowest
                assert name in ("tova", "tova-head")
                full = prio.expand(B, Hkv, k + 1)[b, h]
                assert full[-1] == full.min()
            if name == "sinks":
                assert {p for p in pos[b, h].tolist() if p < 4} <= set(kept)
            if name in ("h2o", "h2o-layer"):
                assert {p for p in pos[b, h].tolist() if p > 3 * k - k // 2} <= set(kept)


# --- on tiny models ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 6])
def test_window_equals_transformers_mistral_sliding_window_k_plus_1(k):
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(k))
    _, model = tiny("llama", seed=k)
    ours, _ = scan(model, tokens, Window(k))
    ref_hf = hf_model("mistral", seed=k, sliding_window=k + 1)
    ref_hf.load_state_dict(hf_model("llama", seed=k).state_dict())  # same weights, Mistral's windowed attention
    with torch.no_grad():
        ref = ref_hf(tokens).logits
    assert (ours - ref).abs().max() <= TOL
    off_by_one = hf_model("mistral", seed=k, sliding_window=k)
    off_by_one.load_state_dict(ref_hf.state_dict())
    with torch.no_grad():
        assert (ours - off_by_one(tokens).logits).abs().max() > 1e-3  # k states attend to k+1 tokens, not k


@pytest.mark.parametrize("name", BOUNDED)
@pytest.mark.parametrize("positions", ["absolute", "shift", "loglog"])
def test_budget_at_least_the_sequence_equals_full(name, positions):
    hf, model = tiny("llama", seed=3)
    tokens = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    policy = make_policy(name, 20, positions=positions)
    ours, state = scan(model, tokens, policy)
    assert torch.equal(ours, scan(model, tokens, None)[0])  # bit-identical to the unbounded recurrence
    assert (ours - full).abs().max() <= TOL
    for mode in ("exact", "fast"):
        logits, _ = model.prefill(tokens, policy=policy, mode=mode, all_logits=True)
        assert (logits - full).abs().max() <= TOL


@pytest.mark.parametrize("name", BOUNDED)
def test_state_size_is_min_t_k_and_fixed_parts_stay(name):
    _, model = tiny("llama", seed=4, num_key_value_heads=2)
    k, T = 6, 25
    policy = make_policy(name, k)
    tokens = torch.randint(0, 97, (3, T), generator=torch.Generator().manual_seed(2))
    state = model.init_state(3, policy)
    for t in range(T):
        _, state = model.step(tokens[:, t], state, policy)
        n = t + 1
        expect = (n % (k + 1)) if name == "baseline" else min(n, k)  # baseline: chunks of k+1 tokens
        assert state.sizes == [expect] * len(state.layers)
        for ls in state.layers:
            held = ls.pos[:, :, : ls.size]
            assert (held >= 0).all()
            if name == "sinks" and n > 4:
                assert all(set(range(4)) <= set(h.tolist()) for h in held.reshape(-1, ls.size))
            if name in ("h2o", "h2o-layer"):
                assert all(set(range(max(0, n - k // 2), n)) <= set(h.tolist()) for h in held.reshape(-1, ls.size))
            if name == "window":
                assert all(sorted(h.tolist()) == list(range(max(0, n - k), n)) for h in held.reshape(-1, ls.size))


def test_bounded_tova_equals_transformers_with_the_same_evictions():
    """TOVA run by msrnn equals transformers' model whose DynamicCache loses, after every step, the entry with the
    lowest head-mean attention of the new query (output_attentions=True) - an independent implementation."""
    k = 5
    hf, model = tiny("llama", seed=7, num_attention_heads=4, num_key_value_heads=2)
    tokens = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(3))

    def drop(layer, keys, values, attn):  # attn (B, H, 1, S)
        if keys.shape[2] <= k:
            return keys, values
        keep = torch.ones(keys.shape[2], dtype=torch.bool)
        keep[attn[0, :, -1].mean(0).argmin()] = False
        return keys[:, :, keep], values[:, :, keep]

    ours, _ = scan(model, tokens, TOVA(k))
    assert (ours - hf_scan(hf, tokens, drop)).abs().max() <= TOL
    assert (ours - model(tokens)).abs().max() > 1e-3  # and eviction really changed the outputs


def test_rows_of_a_batch_decide_independently():
    _, model = tiny("llama", seed=5)
    a = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(10))
    b = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(11))
    both, state = scan(model, torch.cat([a, b]), TOVA(6))
    alone_a, sa = scan(model, a, TOVA(6))
    alone_b, sb = scan(model, b, TOVA(6))
    assert (both - torch.cat([alone_a, alone_b])).abs().max() <= TOL
    kept = [set(state.layers[0].pos[r, 0, :6].tolist()) for r in range(2)]
    assert kept[0] != kept[1]  # different texts, different survivors


def test_fast_prefill_is_one_eviction_by_the_last_query():
    """fast = unbounded parallel pass, then keep the k states the *last* query attends to most (head-mean), checked
    against transformers' own attention probabilities; exact (the recurrence) keeps a different set."""
    hf, model = tiny("llama", seed=6)
    tokens = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(4))
    k = 7
    _, fast = model.prefill(tokens, policy=TOVA(k), mode="fast")
    _, exact = model.prefill(tokens, policy=TOVA(k), mode="exact")
    with torch.no_grad():
        attentions = hf(tokens, output_attentions=True).attentions  # per layer (B, H, T, T)
    for i, a in enumerate(attentions):
        expect = set(a[0, :, -1].mean(0).topk(k).indices.tolist())
        assert fast.layers[i].size == exact.layers[i].size == k
        assert set(fast.layers[i].pos[0, 0, :k].tolist()) == expect
    assert any(set(fast.layers[i].pos[0, 0, :k].tolist()) != set(exact.layers[i].pos[0, 0, :k].tolist())
               for i in range(len(model.layers)))


def test_positions_schemes_change_bounded_outputs_but_not_which_tokens_a_window_keeps():
    _, model = tiny("llama", seed=8)
    tokens = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(5))
    outs = {p: scan(model, tokens, Sinks(8, sinks=2, positions=p)) for p in ("absolute", "shift", "loglog")}
    for p in ("shift", "loglog"):
        assert torch.equal(outs[p][1].layers[0].pos[..., :8].sort(-1).values,
                           outs["absolute"][1].layers[0].pos[..., :8].sort(-1).values)
        assert (outs[p][0][:, 9:] - outs["absolute"][0][:, 9:]).abs().max() > 1e-4  # re-assigned positions matter
        assert (outs[p][0][:, :9] - outs["absolute"][0][:, :9]).abs().max() <= TOL  # before any gap: identical


def test_state_and_policy_position_schemes_must_match():
    _, model = tiny("llama")
    state = model.init_state(1, TOVA(4))
    with pytest.raises(InputError, match="position scheme"):
        model.step(torch.tensor([1]), state, TOVA(4, positions="shift"))


class WrongShape(Policy):
    name = "wrong-shape"

    def priority(self, attn, pos, score):
        return attn.mean(dim=1)  # (B, n): the kv-head axis is missing


class NaNs(Policy):
    name = "nans"

    def priority(self, attn, pos, score):
        return attn.mean(dim=1, keepdim=True) * float("nan")


@pytest.mark.parametrize("policy, message", [(WrongShape(3), "returned torch.float32 \\(1, \\d+\\); a priority is"),
                                             (NaNs(3), "NaN priorities")])
@pytest.mark.parametrize("mode", ["step", "scan", "batch"])
def test_a_policy_returning_a_bad_priority_is_named_in_the_error(policy, message, mode):
    from msrnn.batch import RowPolicies

    _, model = tiny()
    tokens = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match=f"policy '{policy.name}'.*{message}"):
        if mode == "step":
            scan(model, tokens, policy)
        elif mode == "scan":
            model.prefill(tokens, None, policy)
        else:
            model.prefill(tokens.repeat(2, 1), None, RowPolicies([policy, make_policy("tova", 3)], 1))


# --- names, settings and user classes that go wrong (issue 27) --------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    ("tvoa", "unknown policy 'tvoa': did you mean tova\\?"),
    ("h20", "did you mean h2o\\?"),
    ("tova-decay(gama=0.8)", "'tova-decay' does not take a setting 'gama': did you mean gamma\\? Its settings: gamma"),
    ("sinks(sink=2)", "'sinks' does not take a setting 'sink': did you mean sinks\\?"),
    ("tova(gamma=0.8)", "'tova' does not take a setting 'gamma'; it has no settings"),
])
def test_a_misspelled_policy_or_setting_suggests_the_name_meant(spec, message):
    with pytest.raises(InputError, match=message) as e:
        make_policy(spec, 8)
    assert "__init__()" not in str(e.value)


class NoSuper(Policy):
    name = "no-super"

    def __init__(self, states):
        self.k = states  # forgot super().__init__(states)

    def priority(self, attn, pos, score):
        return -pos.float()


class ShortScore(Policy):
    name = "short-score"

    def update(self, score, attn):
        return attn.new_zeros(1)  # one element: it would broadcast over every slot

    def priority(self, attn, pos, score):
        return score


@pytest.mark.parametrize("mode", ["init_state", "step", "scan", "fast", "batch"])
def test_a_policy_whose_init_skipped_super_is_named(mode):
    from msrnn.batch import RowPolicies

    _, model = tiny()
    tokens = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(0))
    policy = NoSuper(4)
    with pytest.raises(InputError, match=r"NoSuper\.__init__ did not call super\(\).__init__\(states"):
        if mode == "init_state":
            model.init_state(1, policy)
        elif mode == "step":
            model.step(tokens[:, 0], model.init_state(1), policy)
        elif mode in ("scan", "fast"):
            model.prefill(tokens, None, policy, mode="exact" if mode == "scan" else "fast")
        else:
            RowPolicies([policy, make_policy("tova", 3)], 1)


@pytest.mark.parametrize("mode", ["step", "scan", "fast", "batch"])
def test_a_policy_update_of_the_wrong_shape_is_named(mode):
    from msrnn.batch import RowPolicies

    _, model = tiny()
    tokens = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(0))
    policy = ShortScore(4)
    with pytest.raises(InputError, match=r"policy 'short-score' \(ShortScore.update\) returned torch.float32 \(1,\); "
                                         r"a score is a float tensor of shape \(B, 1, n\) or \(B, Hkv, n\)"):
        if mode == "step":
            state = model.init_state(1, policy)
            for t in tokens[0]:
                model.step(t[None], state, policy)
        elif mode in ("scan", "fast"):
            model.prefill(tokens, None, policy, mode="exact" if mode == "scan" else "fast")
        else:
            model.prefill(tokens.repeat(2, 1), None, RowPolicies([policy, make_policy("tova", 3)], 1))


def test_a_policy_file_that_exits_while_loading_is_an_error(tmp_path):
    (tmp_path / "quits.py").write_text("raise SystemExit(0)\n")
    with pytest.raises(InputError, match=r"policy file .*quits.py failed to run: SystemExit: 0"):
        make_policy(f"{tmp_path / 'quits.py'}:Mine", 8)
