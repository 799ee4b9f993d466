"""Budgets per layer (`states` as a list, PyramidKV) and KeyDiff: equations checked by hand on plain numbers and
tensors; on a tiny Llama, a per-layer policy gives the same logits stepped, scanned layer-major and through
transformers' PolicyCache, every layer stays within its own budget, and a list of the wrong length is one clear
error wherever a budget is accepted."""
import argparse
import tempfile

import pytest
import torch

import msrnn
from msrnn.errors import InputError
from msrnn.eval import perplexity
from msrnn.grid import check_layers, parse_grid
from msrnn.policies import INF, KeyDiff, PerLayer, PyramidKV, SnapKV, TOVA, layer_budgets, make_policy, parse_states
from test_eval import checkpoint, ppl_args, text_file  # noqa: F401 (fixtures of the tiny eval checkpoint)
from tiny import hf_model, save

TOL = 1e-5  # fp32


@pytest.fixture(scope="module")
def llama4():
    """A 4-layer tiny Llama (transformers, "msrnn" attention) and msrnn's model of the same weights."""
    hf = hf_model("llama", seed=11, num_hidden_layers=4)
    with tempfile.TemporaryDirectory() as d:
        model = msrnn.load_model(save(hf, d))
    return hf, model


def ids(B, T, seed=0):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


# --- PyramidKV's budgets, by hand ----------------------------------------------------------------------------------
def test_pyramid_budgets_by_hand():
    # k = 16, w = 4, beta = 4, L = 4: r = 12, top part 12/4 = 3, bottom part 2*12 - 3 = 21, step (21-3)/3 = 6
    assert PyramidKV(16, beta=4, window=4).budgets(4) == [4 + 21, 4 + 15, 4 + 9, 4 + 3]  # 25, 19, 13, 7
    # the top part is at least one voted state: r / beta = 8/20 -> 1; bottom 2*8 - 1 = 15; step 7
    assert PyramidKV(10, beta=20, window=2).budgets(3) == [17, 10, 3]
    # fractions: k = 8, w = 3, beta = 2: parts 7.5, 5.83, 4.17, 2.5 -> budgets 10.5, 8.83, 7.17, 5.5; running sums
    # 10.5, 19.33, 26.5, 32 round to 11, 19, 27, 32: budgets 11, 8, 8, 5 (each within 1 of exact, same total)
    assert PyramidKV(8, beta=2, window=3).budgets(4) == [11, 8, 8, 5]
    assert PyramidKV(8, beta=1, window=3).budgets(5) == [8] * 5  # beta = 1: the uniform budget
    assert PyramidKV(8).budgets(1) == [8]


@pytest.mark.parametrize("k, layers, beta", [(64, 30, 20), (128, 30, 20), (256, 30, 20), (9, 7, 3.5), (5, 2, 1.5)])
def test_pyramid_total_equals_layers_times_mean(k, layers, beta):
    p = PyramidKV(k, beta=beta)
    b = p.budgets(layers)
    assert sum(b) == layers * k and len(b) == layers
    assert b[0] >= b[-1] and min(b) > p.window  # large below, small above, every layer keeps its window and more
    assert all(x - y >= -1 for x, y in zip(b, b[1:]))  # non-increasing up to the rounding
    assert [p.at_layer(i, layers).states for i in range(layers)] == b
    assert all(type(p.at_layer(i, layers)) is SnapKV for i in range(layers))  # each layer: SnapKV, its own k


def test_pyramidkv_settings_are_checked():
    with pytest.raises(InputError, match="beta"):
        PyramidKV(64, beta=0.5)
    assert make_policy("pyramidkv(beta=5, window=8)", 64).budgets(2) == [109, 19]  # r = 56, parts 100.8 and 11.2


# --- KeyDiff, by hand ------------------------------------------------------------------------------------------------
def test_keydiff_by_hand():
    # keys (1, 0), (0, 1), (2, 0) and an empty slot holding (0, 5): unit keys (1,0), (0,1), (1,0); anchor (2/3, 1/3),
    # |anchor| = sqrt(5)/3, so cos = 2/sqrt(5), 1/sqrt(5), 2/sqrt(5): the odd one out, position 1, ranks highest
    keys = torch.tensor([[[[1.0, 0], [0, 1], [2, 0], [0, 5]]]])  # (B=1, Hkv=1, n=4, hd=2)
    pos = torch.tensor([[[0, 1, 2, -1]]])
    prio = KeyDiff(2).priority(None, pos, torch.zeros(1, 1, 4), keys=keys)
    s5 = 5 ** 0.5
    assert torch.allclose(prio[0, 0, :3], torch.tensor([-2 / s5, -1 / s5, -2 / s5]))
    assert KeyDiff.needs_keys and not KeyDiff.needs_attention  # fused attention in msrnn.hf


# --- per-layer budgets through the model ----------------------------------------------------------------------------
def test_per_layer_list_makes_one_policy_per_layer():
    p = make_policy("h2o", [8, 6, 4, 2])
    assert isinstance(p, PerLayer) and p.states == [8, 6, 4, 2] and p.keeps_score and p.name == "h2o"
    assert [m.recent for m in p.members] == [4, 3, 2, 1]  # each member built with its own k (recent = k // 2)
    assert layer_budgets(p, 4) == [8, 6, 4, 2] and layer_budgets(TOVA(5), 3) == [5, 5, 5]
    for states in ([8, 6], [[8, 4], [6, 6]]):  # a position scheme reaches every member (it was a TypeError)
        p = make_policy("tova", states, positions="shift")
        assert p.positions == "shift" and {m.positions for m in p.members} == {"shift"}


@pytest.mark.parametrize("name", ["tova", "h2o", "sinks(sinks=1)"])
def test_per_layer_step_equals_scan_equals_policy_cache(llama4, name):
    hf_bridge = pytest.importorskip("msrnn.hf")
    hf, model = llama4
    budgets = [9, 7, 5, 3]
    policy = make_policy(name, budgets)
    x = ids(2, 20)
    scanned, state = model.prefill(x, policy=policy, all_logits=True, chunk=8)  # layer-major, chunks of 8
    stepped, s2 = [], model.init_state(2, policy)
    for t in range(20):
        logits, s2 = model.step(x[:, t], s2, policy)
        stepped.append(logits)
    assert (torch.stack(stepped, 1) - scanned).abs().max() <= TOL
    assert state.sizes == s2.sizes == budgets  # every layer full to its own budget, no more
    assert [layer.capacity for layer in model.init_state(1, policy).layers] == [k + 2 for k in budgets]
    hf.set_attn_implementation(hf_bridge.ATTENTION)
    cache = hf_bridge.PolicyCache(policy)
    with torch.no_grad():
        theirs = hf(x, cache=cache).logits  # one call: the prompt evicts token by token inside it
    assert (theirs - scanned).abs().max() <= TOL
    assert cache.sizes == budgets
    cache = hf_bridge.PolicyCache(policy)
    with torch.no_grad():
        hf(x[:, :1], cache=cache)
    assert [layer.state.capacity for layer in cache.layers] == [k + 2 for k in budgets]  # preallocated per layer


def test_pyramidkv_states_never_exceed_their_layer_budgets(llama4):
    hf_bridge = pytest.importorskip("msrnn.hf")
    hf, model = llama4
    policy = PyramidKV(6, beta=3, window=2)
    budgets = policy.budgets(4)
    assert budgets == [9, 7, 5, 3]  # r = 4: parts 7, 5, 3, 1.33 -> round to the same total 24
    x = ids(2, 16, seed=1)
    state, stepped = model.init_state(2, policy), []
    for t in range(16):
        logits, state = model.step(x[:, t], state, policy)
        stepped.append(logits)
        assert all(n <= min(k, t + 1) for n, k in zip(state.sizes, budgets))
    assert state.sizes == budgets
    hf.set_attn_implementation(hf_bridge.ATTENTION)
    cache = hf_bridge.PolicyCache(policy)
    with torch.no_grad():
        theirs = torch.cat([hf(x[:, t : t + 1], cache=cache).logits for t in range(16)], 1)
    assert (theirs - torch.stack(stepped, 1)).abs().max() <= TOL and cache.sizes == budgets


def test_eval_perplexity_of_pyramidkv_equals_its_recurrence(llama4):
    """eval copies a policy's first tokens from the full model until it must evict: with budgets per layer that is
    the smallest layer's budget, not the mean (a shortcut taken at the mean would change these losses)."""
    _, model = llama4
    x = ids(1, 24, seed=2)
    policy = PyramidKV(6, beta=3, window=2)  # layer 3 keeps 3 states: it evicts from the 4th token on
    logits, _ = model.prefill(x, policy=policy, all_logits=True)
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="none")
    assert (perplexity(model, x[0], policy) - expected).abs().max() <= TOL
    both = msrnn.eval.score(model, x, [make_policy("tova", [9, 7, 5, 3]), policy, None])
    assert (both[1].loss[0] - expected).abs().max() <= TOL  # in a batch of rows with other policies


# --- one clear error ------------------------------------------------------------------------------------------------
def test_wrong_length_is_one_clear_error(llama4):
    hf_bridge = pytest.importorskip("msrnn.hf")
    hf, model = llama4
    policy = make_policy("tova", [8, 4])
    for call in (lambda: model.init_state(1, policy), lambda: model.step(torch.tensor([1]), None, policy),
                 lambda: model.prefill(ids(1, 5), policy=policy)):
        with pytest.raises(InputError, match="2 per-layer budgets for a model of 4 layers; give exactly 4"):
            call()
    hf.set_attn_implementation(hf_bridge.ATTENTION)
    with pytest.raises(InputError, match="give exactly 4"), torch.no_grad():
        hf(ids(1, 5), cache=hf_bridge.PolicyCache(policy))
    with pytest.raises(InputError, match="give exactly 4"):
        check_layers(["full", "tova"], [64, (8, 4)], 4)


@pytest.mark.parametrize("bad", ["[8, 4.5]", "[]", "[8, x]", "8,4", "[8, True]", "abc"])
def test_bad_per_layer_lists_are_refused(bad):
    with pytest.raises(InputError, match="--states"):
        parse_states(bad)


def test_bad_lists_in_the_grid_and_in_make_policy():
    with pytest.raises(InputError, match="--states"):
        parse_grid("tova", "64,[8,x]")
    with pytest.raises(InputError, match="--states"):
        parse_grid("tova", "64,[8,0]")
    with pytest.raises(InputError, match="whole numbers"):
        make_policy("tova", [8, 2.5])
    with pytest.raises(InputError, match="sinks"):  # each layer's budget is checked by the policy itself
        make_policy("sinks", [8, 4])
    names, budgets = parse_grid("tova,pyramidkv", "128,64,[96,64,32],[8,8,8]")
    assert budgets == [(8, 8, 8), (96, 64, 32), 64, 128]  # sorted by mean budget
    assert parse_states("[96, 64,32]") == [96, 64, 32] and parse_states(" 256 ") == 256


def test_cli_states_option_takes_a_list(capsys):
    from msrnn.cli import policy_options

    p = argparse.ArgumentParser()
    policy_options(p, "tova", None)
    assert p.parse_args(["--states", "[4,3,2]"]).states == [4, 3, 2]
    assert p.parse_args(["--states", "64"]).states == 64
    with pytest.raises(SystemExit):
        p.parse_args(["--states", "[4,x]"])
    assert "one per layer in brackets" in capsys.readouterr().err  # msrnn's message, through argparse



def test_eval_ppl_grid_with_per_layer_budgets_resumes(checkpoint, text_file, tmp_path, capsys):
    """`msrnn eval ppl --states "6,[10,6]"` on test_eval's tiny 2-layer checkpoint: the per-layer column is in the
    table, --resume reads the per-layer units back (a list in JSON) to the same table, and a list of the wrong
    length is one error before any run."""
    import json

    from msrnn.cli import main

    args = ppl_args(checkpoint, text_file, tmp_path / "out", "--policies", "tova,pyramidkv")
    args[args.index("--states") + 1] = "6,[10,6]"
    assert main(args) == 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| policy | 6 | [10,6] |" in table  # sorted by mean budget
    cells = json.loads((tmp_path / "out" / "results.json").read_text())["cells"]
    assert {(c["policy"], str(c["states"])) for c in cells} >= {("tova", "[10, 6]"), ("pyramidkv", "[10, 6]")}
    assert main([*args, "--resume"]) == 0 and (tmp_path / "out" / "table.md").read_text() == table
    bad = ppl_args(checkpoint, text_file, tmp_path / "bad", "--policies", "tova")
    bad[bad.index("--states") + 1] = "6,[8,4,2]"
    with pytest.raises(SystemExit):
        main(bad)
    assert "3 per-layer budgets for a model of 2 layers" in capsys.readouterr().err
