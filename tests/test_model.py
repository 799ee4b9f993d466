"""The recurrence's contract (in-place state, prefill == scan == parallel) and the loader's errors."""
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import msrnn
from msrnn.config import Config
from msrnn.errors import CheckpointError, ConfigError, InputError
from msrnn.policies import Window
from tiny import hf_model, save

TOL = 1e-5


@pytest.fixture(scope="module")
def ckpt():
    d = tempfile.mkdtemp()
    hf = hf_model("llama", seed=1, tie_word_embeddings=True)
    save(hf, d)
    yield Path(d), hf
    shutil.rmtree(d)


@pytest.fixture(scope="module")
def model(ckpt):
    return msrnn.load_model(ckpt[0])


def test_step_updates_the_state_in_place_and_fork_keeps_the_old_one(model):
    state = model.init_state(2)
    _, state = model.step(torch.tensor([1, 2]), state)
    before = state.fork()
    logits, after = model.step(torch.tensor([3, 4]), state)
    assert after is state and state.size == 2 and before.size == 1  # explicit in-place API, fork is untouched
    assert before.next_pos.tolist() == [1, 1] and after.next_pos.tolist() == [2, 2]
    k0 = before.layers[0].keys[:, :, :1].clone()
    _, again = model.step(torch.tensor([3, 4]), before)
    assert torch.equal(again.layers[0].keys[:, :, :1], k0)
    assert before.layers[0].keys.data_ptr() != state.layers[0].keys.data_ptr()


def test_prefill_exact_and_fast_equal_the_parallel_forward_when_unbounded(model):
    tokens = torch.randint(0, 97, (3, 17))
    ref = model(tokens)
    for mode in ("exact", "fast"):
        logits, state = model.prefill(tokens, mode=mode, all_logits=True)
        assert (logits - ref).abs().max() <= TOL and state.size == 17
        last, _ = model.prefill(tokens, mode=mode)
        assert (last - ref[:, -1]).abs().max() <= TOL


def test_prefill_then_step_continues_the_same_sequence(model):
    tokens = torch.randint(0, 97, (2, 12))
    ref = model(tokens)
    _, state = model.prefill(tokens[:, :7])
    for t in range(7, 12):
        logits, state = model.step(tokens[:, t], state)
        assert (logits - ref[:, t]).abs().max() <= TOL
    chunks, state2 = model.prefill(tokens[:, :5])
    more, state2 = model.prefill(tokens[:, 5:], state2, all_logits=True)  # a chunked prefill attends to the past
    assert (more - ref[:, 5:]).abs().max() <= TOL


def test_bfloat16_runs_and_stays_close(ckpt):
    m32 = msrnn.load_model(ckpt[0])
    m16 = msrnn.load_model(ckpt[0], dtype="bf16")
    assert m16.dtype == torch.bfloat16 and m16.init_state(1).layers[0].keys.dtype == torch.bfloat16
    tokens = torch.randint(0, 97, (1, 10))
    a, b = m32(tokens), m16(tokens)
    assert b.dtype == torch.float32  # logits always come back in fp32
    assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 0.05  # bf16 has ~3 significant digits


def test_bad_tokens_and_states_are_clear_errors(model):
    state = model.init_state(2)
    with pytest.raises(InputError, match="out of range"):
        model.step(torch.tensor([1, 97]), state)
    with pytest.raises(InputError, match="out of range"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(InputError, match="batch size 2"):
        model.step(torch.tensor([1, 2, 3]), state)
    with pytest.raises(InputError, match="one token per batch row"):
        model.step(torch.tensor([[1, 2]]), state)
    with pytest.raises(InputError, match="integer ids"):
        model.step(torch.tensor([1.0, 2.0]), state)
    with pytest.raises(InputError, match="mode"):
        model.prefill(torch.tensor([[1, 2]]), mode="slow")
    with pytest.raises(InputError, match="Policy"):
        model.step(torch.tensor([1, 2]), state, policy="tova")
    with pytest.raises(InputError, match="batch_size"):
        model.init_state(0)
    assert state.size == 0  # nothing was half-applied


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_config_errors(ckpt, tmp_path):
    base = json.loads((ckpt[0] / "config.json").read_text())
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        Config.from_dict({**base, "rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}})
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        Config.from_dict({**base, "model_type": "gpt2"})
    with pytest.raises(ConfigError, match="hidden_act 'gelu'"):
        Config.from_dict({**base, "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        Config.from_dict({**base, "num_key_value_heads": 3})
    with pytest.raises(ConfigError, match="rope type 'su'"):  # old-style rope_scaling is read too
        Config.from_dict({**{k: v for k, v in base.items() if k != "rope_parameters"},
                          "rope_theta": 1e4, "rope_scaling": {"type": "su", "factor": 2.0}})
    old = Config.from_dict({**{k: v for k, v in base.items() if k != "rope_parameters"},
                            "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (old.rope.type, old.rope.theta, old.rope.factor) == ("linear", 5e5, 2.0)
    with pytest.raises(ConfigError, match="rope type 'yarn'"):  # the loader surfaces it as is
        msrnn.load_model(_edit_config(ckpt[0], tmp_path / "yarn",
                                                        rope_parameters={"rope_type": "yarn", "factor": 2.0}))


@pytest.mark.parametrize("edit, message", [
    ({"num_hidden_layers": 2**31}, "num_hidden_layers"),  # a 650-byte config must not allocate 2**31 layers
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"hidden_size": "64"}, "hidden_size"),  # numbers as strings are refused, not guessed
    ({"vocab_size": True}, "vocab_size"),
    ({"num_key_value_heads": -2}, "num_key_value_heads"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"head_dim": 7}, "even"),
    ({"rms_norm_eps": -1}, "rms_norm_eps"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "rope_theta"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}}, "rope_theta"),
    ({"rope_parameters": {"rope_type": "linear", "factor": "abc", "rope_theta": 1e4}}, "factor"),
    ({"eos_token_id": 10**6}, "eos_token_id"),
    ({"bos_token_id": "x"}, "bos_token_id"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
])
def test_config_values_are_checked_once_at_the_boundary(ckpt, edit, message):
    base = json.loads((ckpt[0] / "config.json").read_text())
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({**base, **edit})


@pytest.mark.parametrize("text", ["[1, 2]", "null", '"llama"', "{broken"])
def test_a_config_that_is_not_an_object_is_a_config_error(ckpt, tmp_path, text):
    directory = _edit_config(ckpt[0], tmp_path / "bad")
    (directory / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="config"):
        msrnn.load_model(directory)


def test_checkpoint_errors(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(ckpt[0] / "model.safetensors"))
    missing = tmp_path / "missing"
    shutil.copytree(ckpt[0], missing)
    save_file({k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k}, str(missing / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        msrnn.load_model(missing)
    extra = tmp_path / "extra"
    shutil.copytree(ckpt[0], extra)
    save_file({**sd, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)}, str(extra / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected.*q_norm"):
        msrnn.load_model(extra)
    shape = _edit_config(ckpt[0], tmp_path / "shape", intermediate_size=50)
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight has shape \(48, 32\).*\(50, 32\)"):
        msrnn.load_model(shape)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(ckpt[0] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x02not really")
    with pytest.raises(CheckpointError, match="never unpickles.*safe_serialization=True"):
        msrnn.load_model(pickled)
    with pytest.raises(CheckpointError, match="never unpickles"):
        msrnn.load_model(pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="does not exist"):
        msrnn.load_model(tmp_path / "nowhere")
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        msrnn.load_model(tmp_path / "noconfig")
    with pytest.raises(CheckpointError, match="dtype"):
        msrnn.load_model(ckpt[0], dtype="float16")


def test_tied_checkpoint_that_also_stores_lm_head_loads(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "both"
    shutil.copytree(ckpt[0], d)
    sd = load_file(str(d / "model.safetensors"))
    save_file({**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()}, str(d / "model.safetensors"))
    m = msrnn.load_model(d)
    tokens = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        assert (m(tokens) - ckpt[1](tokens).logits).abs().max() <= TOL


def test_hub_id_resolves_from_the_local_cache_offline(ckpt, tmp_path, monkeypatch):
    """A hub id goes through huggingface_hub.snapshot_download; offline it is served from a pre-populated cache."""
    import huggingface_hub

    cache = tmp_path / "hub"
    snap = cache / "models--tiny-org--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(ckpt[0], snap)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    m = msrnn.load_model("tiny-org/tiny-llama")
    tokens = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        assert (m(tokens) - ckpt[1](tokens).logits).abs().max() <= TOL
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        msrnn.load_model("tiny-org/not-cached")


def test_bounded_state_on_a_mistral_window_model_keeps_matching(tmp_path):
    """A Mistral sliding window and a policy compose: the window masks by position, the policy bounds memory."""
    hf = hf_model("mistral", seed=2, sliding_window=4)
    m = msrnn.load_model(save(hf, tmp_path / "m"))
    tokens = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        ref = hf(tokens).logits
    out, state = [], m.init_state(1, Window(3))  # 3 states + the new token = the 4-token window: nothing lost
    for t in range(20):
        logits, state = m.step(tokens[:, t], state, Window(3))
        out.append(logits)
    assert (torch.stack(out, 1) - ref).abs().max() <= TOL and state.size == 3


def test_step_with_a_state_or_policy_of_the_wrong_type_is_a_clear_error(model):
    token = torch.tensor([1])
    with pytest.raises(InputError, match="state must be a msrnn State.*got str"):
        model.step(token, "garbage")
    with pytest.raises(InputError, match="policy must be a msrnn.policies.Policy.*got str.*make_policy"):
        model.step(token, None, "tova")
    with pytest.raises(InputError, match="policy must be a msrnn.policies.Policy.*got str"):
        model.init_state(1, "tova")
    with pytest.raises(InputError, match="state must be a msrnn State.*got dict"):
        model.prefill(torch.tensor([[1, 2]]), {})
