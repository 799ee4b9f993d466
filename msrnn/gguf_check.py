"""What a GGUF file must be before msrnn reads it: the header walked with every count checked against the file's size
(`scan_gguf_header`, before the gguf package, which trusts them, allocates anything), the llama.* metadata
(`check_gguf_metadata`, `parse_gguf_config`), the tensors' names, types and shapes (`hf_name_of`, `check_gguf_tensors`)
and a rope_freqs tensor (`check_rope_freqs`). Reading is msrnn/gguf.py's."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

from .config import LIMITS, Config
from .errors import CheckpointError, ConfigError
from .tensors import expected_shapes

# llama.cpp's tensor names -> HF Llama names (per layer, the ".weight"/".bias" suffix is kept)
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")


def hf_name_of(name: str) -> tuple[str, str | None]:
    """(HF parameter name, llama.cpp part such as 'attn_q') for a GGUF tensor name."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name], None
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES \
            and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}", parts[2]
    raise CheckpointError(f"GGUF tensor {name!r} has no counterpart in a Llama model; msrnn cannot load this file.")


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
        hf_name, _ = hf_name_of(name)
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


def check_rope_freqs(r: np.ndarray, head_dim: int) -> None:
    if r.shape != (head_dim // 2,) or not np.isfinite(r).all() or (r <= 0).any():
        raise CheckpointError(f"GGUF tensor rope_freqs.weight must hold {head_dim // 2} positive finite wavelength "
                              f"factors (head_dim {head_dim} / 2), got shape {r.shape}; the file is damaged.")
