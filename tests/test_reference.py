"""msrnn/reference.py is the spec: the one-page multi-state RNN and the engine compute the same function.

Side by side over the same tokens: the reference stepped token by token; `model.step` token by token (ring_step
once a layer is full); `model.prefill(mode="exact")` (the layer-major scan, in chunks); and, for a few policies, a
compiled step (torch.compile, backend aot_eager: no C++ compiler needed). Equal logits (fp32, <= 1e-5) and the same
positions kept in every layer and kv head (as sets: slot order means nothing), for every built-in policy, budgets
{the policy's smallest, small, >= T}, budgets per layer and per kv head, every position scheme, tiny random Llama/Mistral models.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import msrnn
from msrnn.config import Config, RopeConfig
from msrnn.errors import MsrnnError
from msrnn.policies import POLICIES, POSITION_SCHEMES, make_policy
from msrnn.reference import Reference
from tiny import POLICY_NAMES, schemes
from msrnn.state import EMPTY

TOL = 1e-5
NAMES = ["full", *POLICY_NAMES]


def tiny(model_type="llama", kv=2, groups=2, layers=2, window=None, max_pos=64, rope="default", tie=False,
         bias=False, seed=0) -> msrnn.Transformer:
    """A random fp32 model built directly (no transformers): weights far from their init, so attention is peaked."""
    heads = kv * groups
    cfg = Config(model_type=model_type, vocab_size=61, hidden_size=heads * 8, intermediate_size=24,
                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=8,
                 max_position_embeddings=max_pos, sliding_window=window, tie_word_embeddings=tie,
                 attention_bias=bias, mlp_bias=bias, rope=RopeConfig(type=rope, factor=2.0))
    torch.manual_seed(seed)
    model = msrnn.Transformer(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.15)
    return model


def smallest(name: str, positions: str = "absolute") -> int:
    """The smallest budget the policy takes (h2o needs 2, sinks more than its 4 sinks)."""
    for k in range(1, 64):
        try:
            make_policy(name, k, positions=positions)
            return k
        except MsrnnError:
            pass
    raise AssertionError(name)


def held(state) -> list[list[set[int]]]:
    """Per layer and kv head: the positions the engine's state holds (row 0)."""
    return [[{p for p in layer.pos[0, h, : layer.size].tolist() if p != EMPTY} for h in range(layer.pos.shape[1])]
            for layer in state.layers]


def side_by_side(model, tokens: list[int], policy, chunk: int = 256, prefill: bool = True) -> None:
    """Reference and model.step token by token (logits and kept positions after every token), then an exact
    prefill over the same tokens (every token's logits, kept positions at the end)."""
    ref, state = Reference(model, policy), model.init_state(1, policy)
    expected = []
    for t, token in enumerate(tokens):
        expected.append(ref.step(token))
        logits, state = model.step(torch.tensor([token]), state, policy)
        torch.testing.assert_close(logits[0], expected[-1], rtol=0, atol=TOL, msg=lambda m: f"step {t}: {m}")
        assert held(state) == ref.held(), f"step {t}: the engine holds {held(state)}, the reference {ref.held()}"
    if prefill:
        logits, state = model.prefill(torch.tensor([tokens]), None, policy, mode="exact", all_logits=True,
                                      chunk=chunk)
        torch.testing.assert_close(logits[0], torch.stack(expected), rtol=0, atol=TOL)
        assert held(state) == ref.held()


@pytest.mark.parametrize("name", NAMES)
def test_every_policy_and_budget_matches_the_reference(name):
    """Every built-in policy (and none), budgets {smallest, small, >= T}, on a GQA Llama and a Mistral with a
    sliding window (a state further back than the window is invisible to attention but still held)."""
    tokens = torch.randint(0, 61, (14,), generator=torch.Generator().manual_seed(1)).tolist()
    for model in (tiny(), tiny("mistral", kv=2, groups=2, window=4, seed=1)):
        if name == "full":
            side_by_side(model, tokens, None)
            continue
        k0 = smallest(name)
        for k in sorted({k0, k0 + 2, len(tokens) + 1}):
            side_by_side(model, tokens, make_policy(name, k), chunk=5)


@pytest.mark.parametrize("name", ["tova", "h2o", "tova-decay-head", "keydiff", "snapkv", "baseline"])
def test_per_layer_budgets_match_the_reference(name):
    k0 = smallest(name)
    tokens = torch.randint(0, 61, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    side_by_side(tiny(layers=3), tokens, make_policy(name, [k0 + 4, k0, k0 + 1]), chunk=4)


@pytest.mark.parametrize("name", [n for n in POLICY_NAMES if n != "pyramidkv"])  # pyramidkv sets its own budgets
def test_budgets_per_kv_head_match_the_reference(name):
    """make_policy(name, [[k_00, k_01], [k_10, k_11]]): kv head h of layer l keeps its own top k_lh states (PerHead:
    budget() is a (1, Hkv, 1) tensor, and each kv head is a row of its own to the policy)."""
    k0 = smallest(name)
    tokens = torch.randint(0, 61, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    side_by_side(tiny(kv=2), tokens, make_policy(name, [[k0, k0 + 3], [k0 + 2, k0]]), chunk=4)


@st.composite
def cases(draw):
    model_type = draw(st.sampled_from(["llama", "mistral"]))
    T = draw(st.integers(2, 16))
    model = dict(model_type=model_type, kv=draw(st.integers(1, 2)), groups=draw(st.integers(1, 2)),
                 layers=draw(st.integers(1, 2)), tie=draw(st.booleans()), bias=draw(st.booleans()),
                 rope=draw(st.sampled_from(["default", "linear", "dynamic"])), seed=draw(st.integers(0, 99)),
                 max_pos=draw(st.sampled_from([8, 64])),  # 8: rebase renumbers, dynamic RoPE scales within T
                 window=draw(st.one_of(st.none(), st.integers(2, 8))) if model_type == "mistral" else None)
    name = draw(st.sampled_from(NAMES))
    positions = draw(st.sampled_from(POSITION_SCHEMES if name == "full" else schemes(name)))
    policy = None
    if name != "full":
        k0 = smallest(name, positions)
        budget = st.sampled_from([k0, k0 + draw(st.integers(1, 4)), max(k0, T + 1)])
        k = draw(budget)
        shape = "one" if name == "pyramidkv" else draw(st.sampled_from(["one", "one", "per layer", "per kv head"]))
        if shape == "per layer":
            k = [draw(budget) for _ in range(model["layers"])]
        elif shape == "per kv head":
            k = [[draw(budget) for _ in range(model["kv"])] for _ in range(model["layers"])]
        policy = make_policy(name, k, positions=positions)
    # KeyDiff ranks keys by their cosine to the mean key, with no query: a token repeated at evenly spaced positions
    # gives keys R_i k whose cosines tie exactly in real arithmetic, and rounding (a matrix-vector product here, a
    # matrix product there) breaks the tie either way. Distinct tokens keep its ranking a function of the model.
    tokens = draw(st.lists(st.integers(0, 60), min_size=T, max_size=T, unique=name == "keydiff"))
    return model, policy, tokens, draw(st.integers(1, T))


@settings(max_examples=100, deadline=None)
@given(cases())
def test_random_models_policies_and_schemes_match_the_reference(case):
    model_kw, policy, tokens, chunk = case
    model = tiny(**model_kw)
    # unbounded, a prefill is one forward call and dynamic RoPE scales by its length (transformers' rule), where a
    # step (and the reference) scales by each token's own: they differ past the trained context, by design
    prefill = not (policy is None and model_kw["rope"] == "dynamic" and len(tokens) > model_kw["max_pos"])
    side_by_side(model, tokens, policy, chunk=chunk, prefill=prefill)


def test_a_compiled_step_matches_the_reference():
    """model.compile() (aot_eager: no C++ compiler needed) steps each layer through torch.compile; the full layers
    run ring_step's one graph. It still equals the reference."""
    import torch._dynamo

    tokens = torch.randint(0, 61, (5,), generator=torch.Generator().manual_seed(4)).tolist()
    model = tiny(seed=4, layers=1)
    torch._dynamo.reset()
    model.compile(backend="aot_eager")
    try:
        side_by_side(model, tokens, make_policy("tova", 2), prefill=False)  # more policies: test_scan's check
    finally:
        torch._dynamo.reset()
