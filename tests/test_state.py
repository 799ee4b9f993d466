"""State persistence and copies: save/load continues bit for bit, fork shares nothing, a state knows its model."""
import pytest
import torch

import msrnn
from msrnn.errors import InputError
from msrnn.policies import make_policy
from tiny import hf_model, save

TOKENS = torch.tensor([5, 17, 3, 88, 42, 9, 61, 2, 33, 70, 14, 8])  # 12 ids of the tiny 97-token vocabulary
SPLIT = 7  # tokens fed before saving / forking


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny Llamas of the same shape but different weights, and one with another number of layers."""
    root = tmp_path_factory.mktemp("checkpoints")
    a = save(hf_model(seed=0), root / "model-a")
    b = save(hf_model(seed=1), root / "model-b")
    c = save(hf_model(seed=0, num_hidden_layers=3), root / "model-c")
    return {"a": msrnn.load_model(a), "b": msrnn.load_model(b),
            "c": msrnn.load_model(c), "a-bf16": msrnn.load_model(a, dtype="bf16")}


def feed(model, tokens, state, policy):
    """Step every token of `tokens` (1-D) into `state`; logits (T, vocab)."""
    return torch.stack([model.step(t[None], state, policy)[0][0] for t in tokens])


def saved_state(model, policy, path):
    state = model.init_state(1, policy)
    feed(model, TOKENS[:SPLIT], state, policy)
    state.save(path)
    return state


@pytest.mark.parametrize("policy_name", ["tova", "full"])
def test_save_load_continue_is_bit_identical(models, tmp_path, policy_name):
    model, policy = models["a"], make_policy(policy_name, 4)
    original = saved_state(model, policy, tmp_path / "state.safetensors")
    loaded = msrnn.State.load(tmp_path / "state.safetensors")
    assert loaded.meta == {"model": model.identity, "policy": policy_name, "states": getattr(policy, "states", None)}
    assert loaded.sizes == original.sizes and torch.equal(loaded.next_pos, original.next_pos)
    expected = feed(model, TOKENS[SPLIT:], original, policy)
    got = feed(model, TOKENS[SPLIT:], loaded, policy)
    assert torch.equal(got, expected)  # bit for bit, not allclose
    for a, b in zip(original.layers, loaded.layers):
        assert torch.equal(a.pos[:, :, : a.size], b.pos[:, :, : b.size])


def storages(state):
    tensors = [state.next_pos] + [t for l in state.layers for t in (l.keys, l.values, l.pos, l.score)]
    return [t.untyped_storage().data_ptr() for t in tensors]


def test_fork_shares_no_storage_and_branches_independently(models):
    model, policy = models["a"], make_policy("tova", 4)
    state = model.init_state(1, policy)
    feed(model, TOKENS[:SPLIT], state, policy)
    branch = state.fork()
    assert not set(storages(state)) & set(storages(branch))
    assert all(a.keys.data_ptr() != b.keys.data_ptr() for a, b in zip(state.layers, branch.layers))
    snapshot = state.fork()

    # Mutating the original, by stepping and by hand, leaves the branch exactly as it was...
    feed(model, TOKENS[SPLIT:], state, policy)
    state.layers[0].keys.zero_()
    state.meta["model"] = "changed"
    for a, b in zip(branch.layers, snapshot.layers):
        assert a.size == b.size and all(torch.equal(x, y) for x, y in
                                        zip((a.keys, a.values, a.pos, a.score), (b.keys, b.values, b.pos, b.score)))
    assert torch.equal(branch.next_pos, snapshot.next_pos) and branch.meta == snapshot.meta

    # ...and the branch continues like an untouched copy would.
    assert torch.equal(feed(model, TOKENS[SPLIT:], branch, policy), feed(model, TOKENS[SPLIT:], snapshot, policy))


def test_a_state_of_another_shape_is_refused(models, tmp_path):
    policy = make_policy("tova", 4)
    saved_state(models["a"], policy, tmp_path / "state.safetensors")
    loaded = msrnn.State.load(tmp_path / "state.safetensors")
    with pytest.raises(InputError, match="another shape"):
        models["c"].step(TOKENS[:1], loaded, policy)


def test_a_state_saved_by_another_model_is_a_clear_error(models, tmp_path):
    policy = make_policy("tova", 4)
    saved_state(models["a"], policy, tmp_path / "state.safetensors")
    loaded = msrnn.State.load(tmp_path / "state.safetensors")
    with pytest.raises(InputError, match="dir:model-a"):  # same shapes, other weights: only the identity tells
        models["b"].step(TOKENS[:1], loaded, policy)


def test_a_state_of_another_dtype_is_a_clear_error(models, tmp_path):
    policy = make_policy("tova", 4)
    saved_state(models["a"], policy, tmp_path / "state.safetensors")
    loaded = msrnn.State.load(tmp_path / "state.safetensors")
    with pytest.raises(InputError, match="dtype"):  # today: RuntimeError from inside torch's matmul
        models["a-bf16"].step(TOKENS[:1], loaded, policy)


def _edit_saved(path, edit):
    """Rewrite a saved state file with edit(tensors) applied (the metadata is kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"layers.1.pos": t["layers.1.pos"][:, :, :-1]}), "positions/scores have shapes"),
    (lambda t: t.update({"layers.1.values": t["layers.1.values"][:, :, :-1]}), "keys/values have shapes"),
    (lambda t: t.update({"next_pos": torch.tensor([-1])}), "next_pos"),
    (lambda t: t["layers.1.pos"].__setitem__((0, 0, 0), 10**6), "outside"),
    (lambda t: t["layers.1.pos"].__setitem__((0, 0, 1), int(t["layers.1.pos"][0, 0, 0])), "the same position twice"),
    (lambda t: t["layers.1.keys"].__setitem__((0, 0, 0, 0), float("nan")), "not finite"),
    (lambda t: t.update({"layers.1.keys": t["layers.1.keys"].to(torch.int32)}), "holds torch.int32"),
    (lambda t: t.pop("layers.1.score"), "not a complete"),
])
def test_every_layer_of_a_loaded_state_is_checked(models, tmp_path, edit, message):
    """Damage beyond layer 0 (a cut tensor, a negative next_pos, a position from the future or repeated, NaN) is
    refused at load time with one clear error, instead of continuing with wrong logits."""
    path = tmp_path / "state.safetensors"
    saved_state(models["a"], make_policy("tova", 4), path)
    _edit_saved(path, edit)
    with pytest.raises(InputError, match=message):
        msrnn.State.load(path)
