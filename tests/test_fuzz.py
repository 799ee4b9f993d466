"""Bad input ends in one MsrnnError: never a foreign exception, a hang, or a memory bomb.

Hypothesis mutates every file msrnn reads: config.json, safetensors headers, GGUF headers (bytes) and metadata
(typed values), saved states and eval's results.jsonl. Each load must either succeed, and then give finite logits
(the same logits as the original where the mutation left the parsed config unchanged), or raise an MsrnnError,
within a time and memory bound (`bounded`). Then one named test per kind of problem the project's bad-input issue
lists. Files are tiny and written here (no transformers), so the whole module runs in seconds.
"""
import contextlib
import itertools
import json
import os
import re
import resource
import signal
import struct
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q, GGUFValueType as T  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from msrnn import results as results_file  # noqa: E402
from msrnn.config import Config  # noqa: E402
from msrnn.errors import CheckpointError, ConfigError, InputError, MsrnnError  # noqa: E402
from msrnn.gguf import read_gguf  # noqa: E402
from msrnn.gguf_check import GLOBAL_NAMES, LAYER_NAMES, supported_types  # noqa: E402
from msrnn.policies import make_policy  # noqa: E402
from msrnn.state import State  # noqa: E402
from msrnn.template import render  # noqa: E402
from msrnn.tensors import expected_shapes  # noqa: E402
from msrnn.tokenizer import Tokenizer  # noqa: E402
from msrnn.weights import load_model  # noqa: E402

# 30 examples per property keeps the module at seconds; MSRNN_FUZZ_EXAMPLES=1000 searches harder.
FUZZ = settings(max_examples=int(os.environ.get("MSRNN_FUZZ_EXAMPLES", 30)), deadline=None,
                suppress_health_check=list(HealthCheck))
CONFIG = dict(model_type="llama", vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
# Any JSON value, weighted towards the ones that break loaders: 0, negatives, huge, NaN, strings, containers.
JSON = st.one_of(st.none(), st.booleans(), st.sampled_from([0, -1, 1, 2, 3, 2**31, 2**63, 10**30]),
                 st.integers(-2**40, 2**40), st.floats(), st.text(max_size=4), st.lists(st.integers(-2, 70), max_size=3),
                 st.dictionaries(st.sampled_from(["rope_type", "factor", "type", "a"]), st.integers(-1, 9), max_size=2))


# --- the bound --------------------------------------------------------------------------------------------------
class Hang(BaseException):
    """Raised by the alarm; a BaseException, so no `except Exception` inside msrnn can turn it into an MsrnnError."""


@contextlib.contextmanager
def bounded(seconds: float = 10.0, memory: int = 2 * 2**30):
    """Fail a load that takes longer than `seconds`, and make its allocations fail once it holds `memory` bytes
    more address space than now (a memory bomb ends as an allocation error, which `outcome` fails on)."""
    def alarm(*_):
        raise Hang(f"a load ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[0]) * resource.getpagesize()
    cap = now + memory if hard == resource.RLIM_INFINITY else min(now + memory, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(load):
    """load() within the bound: what it returned, or None when it raised an MsrnnError. Any other exception fails
    the test, and so does an MsrnnError caused by running out of memory (a bomb msrnn wrapped, not one it avoided)."""
    with bounded():
        try:
            return load()
        except MsrnnError as e:
            chain, cause = [], e
            while cause is not None:
                chain.append(cause)
                cause = cause.__cause__ or cause.__context__
            assert not any(isinstance(c, MemoryError) or "allocate" in str(c) for c in chain), chain
            assert str(e) and "\n" not in str(e).strip(), "one clear line"
            return None


def finite_logits(model):
    logits, _ = model.step(torch.tensor([0]))
    assert torch.isfinite(logits).all()
    return logits


_names = itertools.count()


def fresh(root, suffix=""):
    """A new path per example: GGUF readers are cached by (path, size, mtime), which a rewrite may not change."""
    return root / f"x{next(_names)}{suffix}"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# --- a tiny checkpoint directory ----------------------------------------------------------------------------------
def weights(config=CONFIG, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * 0.2 for name, shape in expected_shapes(Config.from_dict(config)).items()}


@pytest.fixture(scope="module")
def checkpoint(root):
    directory = root / "checkpoint"
    directory.mkdir()
    save_file(weights(), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(CONFIG))
    return directory


@pytest.fixture(scope="module")
def reference(checkpoint):
    return finite_logits(load_model(checkpoint))


def with_config(root, checkpoint, config_text: str):
    d = fresh(root)
    d.mkdir()
    (d / "model.safetensors").symlink_to(checkpoint / "model.safetensors")
    (d / "config.json").write_text(config_text)
    return d


@FUZZ
@given(key=st.sampled_from(sorted(CONFIG) + ["head_dim", "rope_scaling", "rope_parameters", "sliding_window",
                                             "hidden_act", "pretraining_tp"]),
       value=JSON, drop=st.booleans(), whole=st.none() | JSON)
def test_fuzz_config_json(root, checkpoint, reference, key, value, drop, whole):
    config = dict(CONFIG)
    if drop:
        config.pop(key, None)
    else:
        config[key] = value
    if whole is not None and not isinstance(whole, dict):
        config = whole  # a list, a number, null: not a config at all
    model = outcome(lambda: load_model(with_config(root, checkpoint, json.dumps(config))))
    if model is not None:
        logits = finite_logits(model)
        if Config.from_dict(config) == Config.from_dict(CONFIG):  # an irrelevant key changed: the same model
            assert torch.equal(logits, reference)


# --- safetensors --------------------------------------------------------------------------------------------------
def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


@FUZZ
@given(data=st.data(), how=st.sampled_from(["entry", "truncate", "length", "flip"]))
def test_fuzz_safetensors_header(root, checkpoint, reference, data, how):
    original = (checkpoint / "model.safetensors").read_bytes()
    header, body = split_safetensors(original)
    if how == "entry":  # one field of one tensor's entry: dtype, shape, offsets, or the entry itself
        name = data.draw(st.sampled_from(sorted(header)))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        value = data.draw(st.sampled_from(["F16", "BF16", "I32", "I64", "U8", "BOOL", "F64", "Q4"]) | JSON)
        if field is None:
            header[name] = value
        else:
            header[name] = {**header[name], field: value} if isinstance(header[name], dict) else value
        mutated = join_safetensors(header, body)
    elif how == "truncate":  # the usual interrupted download
        mutated = original[:data.draw(st.integers(0, len(original) - 1))]
    elif how == "length":  # the 8-byte header length
        mutated = struct.pack("<Q", data.draw(st.sampled_from([0, 1, 2**60, 2**64 - 1]) | st.integers(0, 2**64 - 1)))
        mutated += original[8:]
    else:  # random bytes of the header
        n = int.from_bytes(original[:8], "little")
        at = data.draw(st.integers(0, 8 + n - 1))
        mutated = original[:at] + bytes([data.draw(st.integers(0, 255))]) + original[at + 1:]
    d = fresh(root)
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    (d / "model.safetensors").write_bytes(mutated)
    model = outcome(lambda: load_model(d))
    if model is not None:
        finite_logits(model)


# --- GGUF -----------------------------------------------------------------------------------------------------------
GGUF_NAMES = {hf: name for name, hf in GLOBAL_NAMES.items()}
GGUF_NAMES.update({f"model.layers.{n}.{hf}.weight": f"blk.{n}.{ll}.weight" for n in range(2)
                   for ll, hf in LAYER_NAMES.items()})
VOCAB = ["a", "b", "c", "ab", "bc", "abc", "<s>", "</s>"] + [f"t{i}" for i in range(32)]  # 40 tokens
MERGES = ["a b", "b c", "ab c"]


def write_gguf(path, override: dict | None = None, tensors: dict | None = None):
    """The CONFIG model as a GGUF (one Q8_0 tensor, the rest F32) with a byte-level BPE tokenizer; `override`
    {key: (value, GGUFValueType, sub_type)} replaces or adds metadata, `tensors` {HF name: array} weights."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2), w.add_context_length(64), w.add_embedding_length(32), w.add_feed_forward_length(48)
    w.add_head_count(4), w.add_head_count_kv(2), w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(10000.0)
    w.add_vocab_size(40), w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default"), w.add_token_list(VOCAB)
    w.add_token_types([1] * 6 + [3, 3] + [1] * 32), w.add_token_merges(MERGES), w.add_bos_token_id(6)
    w.add_eos_token_id(7), w.add_chat_template("{% for m in messages %}<s>{{ m.content }}</s>{% endfor %}")
    for key, (value, vtype, sub) in (override or {}).items():
        w.add_key_value(key, value, vtype, sub)
    for hf_name, x in {**weights(), **(tensors or {})}.items():
        x = np.asarray(x)
        if hf_name == "model.embed_tokens.weight":
            w.add_tensor(GGUF_NAMES[hf_name], gguf.quants.quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(GGUF_NAMES[hf_name], x)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(root):
    path = write_gguf(root / "tiny.gguf")
    return path, gguf.GGUFReader(str(path)).data_offset  # the header's length


def load_gguf_everything(path):
    """The model (with finite logits) and the tokenizer (encoding and templating) from one GGUF, or None."""
    model = outcome(lambda: load_model(path))
    if model is not None:
        finite_logits(model)
    tok = outcome(lambda: Tokenizer.from_pretrained(path))
    if tok is not None:
        outcome(lambda: tok.decode(tok.encode("abc ab")) and tok.apply_chat_template([{"role": "user", "content": "a"}]))
    return model, tok


@FUZZ
@given(data=st.data(), how=st.sampled_from(["u64", "u32", "byte", "truncate"]))
def test_fuzz_gguf_header_bytes(root, tiny_gguf, data, how):
    """Counts, lengths, types and offsets of the header overwritten with anything (2^60 items included)."""
    original, header_end = tiny_gguf[0].read_bytes(), tiny_gguf[1]
    if how == "truncate":
        mutated = original[:data.draw(st.integers(4, len(original) - 1))]
    else:
        size = {"u64": 8, "u32": 4, "byte": 1}[how]
        at = data.draw(st.integers(4, header_end - size))
        value = data.draw(st.sampled_from([0, 1, 2**60 % 256**size, 256**size - 1, 2**31 % 256**size])
                          | st.integers(0, 256**size - 1))
        mutated = original[:at] + value.to_bytes(size, "little") + original[at + size:]
    path = fresh(root, ".gguf")
    path.write_bytes(mutated)
    load_gguf_everything(path)


GGUF_VALUES = st.one_of(
    st.tuples(st.integers(0, 2**32 - 1), st.just(T.UINT32), st.none()),
    st.tuples(st.integers(-2**31, -1), st.just(T.INT32), st.none()),
    st.tuples(st.sampled_from([2**60, 2**64 - 1, 0]), st.just(T.UINT64), st.none()),
    st.tuples(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), 1e30, 1.0]), st.just(T.FLOAT32), st.none()),
    st.tuples(st.text(max_size=6), st.just(T.STRING), st.none()),
    st.tuples(st.booleans(), st.just(T.BOOL), st.none()),
    st.tuples(st.lists(st.integers(0, 50), min_size=1, max_size=5), st.just(T.ARRAY), st.just(T.UINT32)),
    st.tuples(st.lists(st.sampled_from(["a", "a b", "", "x y z", "{{"]), min_size=1, max_size=5), st.just(T.ARRAY),
              st.just(T.STRING)),
)
GGUF_KEYS = ["llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
             "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.layer_norm_rms_epsilon",
             "llama.rope.freq_base", "llama.vocab_size", "llama.attention.key_length", "llama.rope.dimension_count",
             "llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.expert_count", "general.architecture",
             "general.alignment", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
             "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
             "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
             "tokenizer.ggml.scores"]


@FUZZ
@given(key=st.sampled_from(GGUF_KEYS), value=GGUF_VALUES)
def test_fuzz_gguf_metadata(root, key, value):
    """One metadata entry replaced by a value of any type (a head count of 0, a string for a size, a list...)."""
    load_gguf_everything(write_gguf(fresh(root, ".gguf"), {key: value}))


# --- saved states ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(root, checkpoint):
    model, policy = load_model(checkpoint), make_policy("tova", 4)
    state = model.init_state(1, policy)
    for t in [3, 5, 7, 9, 11, 13]:
        model.step(torch.tensor([t]), state, policy)
    path = root / "state.safetensors"
    state.save(path)
    return model, policy, path


DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool]


@FUZZ
@given(data=st.data(), how=st.sampled_from(["shape", "dtype", "value", "drop", "meta", "bytes"]))
def test_fuzz_state_file(root, saved, data, how):
    model, policy, path = saved
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    key = data.draw(st.sampled_from(sorted(tensors)))
    if how == "shape":
        shape = data.draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
        tensors[key] = torch.zeros(shape, dtype=tensors[key].dtype)
    elif how == "dtype":
        tensors[key] = tensors[key].to(data.draw(st.sampled_from(DTYPES)))
    elif how == "value" and tensors[key].numel():
        flat = tensors[key].flatten().clone()
        special = [float("nan"), float("inf"), -2, -1, 10**6] if flat.is_floating_point() else [-2, -1, 5, 6, 10**12]
        flat[data.draw(st.integers(0, flat.numel() - 1))] = data.draw(st.sampled_from(special))
        tensors[key] = flat.view(tensors[key].shape)
    elif how == "drop":
        del tensors[key]
    elif how == "meta":
        header = json.loads(meta["msrnn_state"])
        field = data.draw(st.sampled_from(["num_layers", "rope_at_use", "meta"]))
        header[field] = data.draw(JSON)
        meta["msrnn_state"] = data.draw(st.just(json.dumps(header)) | st.text(max_size=5))
    target = fresh(root, ".safetensors")
    save_file(tensors, str(target), metadata=meta)
    if how == "bytes":
        raw = bytearray(target.read_bytes())
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
        target.write_bytes(bytes(raw[:data.draw(st.integers(at, len(raw)))]))
    state = outcome(lambda: State.load(target))
    if state is not None:
        result = outcome(lambda: model.step(torch.tensor([1]), state, policy))
        if result is not None:
            assert torch.isfinite(result[0]).all()


# --- eval's results.jsonl -------------------------------------------------------------------------------------------
SETTINGS = {"model": "m", "context": 8, "prefill": "exact"}
UNITS = [{"policy": "full", "states": None, "batch": 0, "tokens": 14, "loss": 30.5, "agree": 14, "kl": 0.0,
          "chunk_tokens": [7, 7], "chunk_loss": [15.0, 15.5], "chunk_agree": [7, 7], "chunk_kl": [0.0, 0.0]},
         {"policy": "tova", "states": 4, "batch": 0, "tokens": 14, "loss": 31.0, "agree": 12, "kl": 0.25,
          "chunk_tokens": [7, 7], "chunk_loss": [15.0, 16.0], "chunk_agree": [6, 6], "chunk_kl": [0.1, 0.15]}]


@FUZZ
@given(data=st.data(), how=st.sampled_from(["field", "drop", "line", "cut"]))
def test_fuzz_results_jsonl(root, data, how):
    lines = [{"settings": SETTINGS}] + [dict(u) for u in UNITS]
    i = data.draw(st.integers(0, len(lines) - 1))
    texts = [json.dumps(line) for line in lines]
    if how in ("field", "drop"):
        key = data.draw(st.sampled_from(sorted(lines[i])))
        if how == "drop":
            del lines[i][key]
        else:
            lines[i][key] = data.draw(JSON)
        texts[i] = json.dumps(lines[i])
    elif how == "line":
        texts[i] = data.draw(st.text(max_size=8) | JSON.map(json.dumps))
    text = "\n".join(texts) + "\n"
    if how == "cut":
        text = text[:data.draw(st.integers(0, len(text)))]
    path = fresh(root, ".jsonl")
    path.write_text(text)
    units = outcome(lambda: results_file.load_results(path, SETTINGS, resume=True))
    if units:  # what is accepted adds up
        assert all(results_file.unit_problem(u) is None for u in units.values())


# --- one named test per kind of problem -------------------------------------------------------------------------
def refused(error, match, load):
    """load() raises `error` matching `match`, quickly; returns the exception."""
    t0 = time.perf_counter()
    with bounded(), pytest.raises(error, match=match) as e:
        load()
    assert time.perf_counter() - t0 < 5
    return e.value


def test_gguf_array_claiming_2_60_items_fails_fast(tmp_path):
    """The issue's 124-byte file: one metadata array whose header claims 2^60 uint8 items."""
    key = b"tokenizer.ggml.token_type"
    raw = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 0, 2**60)
    path = tmp_path / "bomb.gguf"
    path.write_bytes(raw.ljust(124, b"\0"))
    refused(CheckpointError, r"bomb\.gguf is truncated or damaged: the header claims 1,152,921,504,606,846,976 items",
            lambda: read_gguf(path))


@pytest.mark.parametrize("at, what", [(8, "tensors"), (16, "metadata entries")])
def test_gguf_huge_counts_fail_fast(tiny_gguf, tmp_path, at, what):
    raw = bytearray(tiny_gguf[0].read_bytes())
    raw[at:at + 8] = struct.pack("<Q", 2**62)
    (tmp_path / "counts.gguf").write_bytes(raw)
    refused(CheckpointError, f"claims 4,611,686,018,427,387,904 {what}", lambda: read_gguf(tmp_path / "counts.gguf"))


@pytest.mark.parametrize("key, value, match", [
    ("llama.attention.head_count", 0, r"'llama.attention.head_count' must be an integer in 1..1,024, got 0"),
    ("llama.block_count", 2**31, r"'llama.block_count' must be an integer in 1..1,024, got 2147483648"),
    ("llama.block_count", 1000, r"lacks .* tensor\(s\) its metadata implies .*block_count \(1000\)"),
    ("llama.attention.head_count_kv", 3, "4 attention heads are not a multiple of 3"),
])
def test_gguf_bad_sizes(tmp_path, key, value, match):
    path = write_gguf(tmp_path / "bad.gguf", {key: (value, T.UINT32, None)})
    e = refused(MsrnnError, match, lambda: read_gguf(path))
    assert str(path) in str(e)


def test_gguf_q_tensor_of_the_wrong_size(tmp_path):
    """Before the check, the un-permutation of a (36, 32) Q matrix for 4 heads failed inside torch's reshape."""
    path = write_gguf(tmp_path / "q.gguf", tensors={"model.layers.0.self_attn.q_proj.weight": np.zeros((36, 32), np.float32)})
    refused(CheckpointError, r"tensor 'blk.0.attn_q.weight' has shape \(36, 32\), the metadata implies \(32, 32\)",
            lambda: read_gguf(path))


def test_gguf_unsupported_type_named_with_the_supported_ones(tmp_path):
    path = tmp_path / "i8.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1), w.add_context_length(8), w.add_embedding_length(32), w.add_feed_forward_length(32)
    w.add_head_count(4), w.add_layer_norm_rms_eps(1e-5), w.add_vocab_size(8)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.int8))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    e = refused(CheckpointError, r"'token_embd.weight' is stored as I8, which msrnn cannot read; it reads F32, F16",
                lambda: read_gguf(path))
    assert all(name in str(e) for name in ("Q8_0", "Q4_K", "BF16")) and len(supported_types()) > 10


def test_gguf_tokenizer_without_merges_or_with_a_bad_bos(tmp_path):
    no_merges = write_gguf(tmp_path / "m.gguf", {"tokenizer.ggml.merges": ([1, 2], T.ARRAY, T.UINT32)})
    refused(CheckpointError, "needs tokenizer.ggml.merges", lambda: Tokenizer.from_pretrained(no_merges))
    bos = write_gguf(tmp_path / "b.gguf", {"tokenizer.ggml.bos_token_id": (999, T.UINT32, None)})
    refused(CheckpointError, r"b.gguf: tokenizer.ggml.bos_token_id is 999, not an id of its 40 tokens",
            lambda: Tokenizer.from_pretrained(bos))


def test_nan_weights_refused(tmp_path, checkpoint):
    w = weights()
    w["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(w, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    refused(CheckpointError, "up_proj.weight holds NaN or infinite values", lambda: load_model(tmp_path))


def test_int_weights_refused_not_cast(tmp_path):
    w = weights()
    w["model.norm.weight"] = w["model.norm.weight"].to(torch.int32)
    save_file(w, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    refused(CheckpointError, "'model.norm.weight' is stored as 'I32'; model weights must be floating point",
            lambda: load_model(tmp_path))


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[:len(b) // 2], r"is truncated: its tensors need [\d,]+ bytes, the file has [\d,]+; re-download"),
    (lambda b: b[:5], "is truncated"),
    (lambda b: struct.pack("<Q", 2**40) + b[8:], "claims a header of 1,099,511,627,776 bytes"),
    (lambda b: struct.pack("<Q", 4) + b"{{{{" + b[12:], "its header is not JSON"),
])
def test_damaged_safetensors(tmp_path, checkpoint, damage, match):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "model.safetensors").write_bytes(damage((checkpoint / "model.safetensors").read_bytes()))
    e = refused(CheckpointError, match, lambda: load_model(tmp_path))
    assert "model.safetensors" in str(e)


def test_damage_safetensors_missed_keeps_the_cause(tmp_path, checkpoint):
    """A header our scan passes but the library refuses (a shape that disagrees with its offsets): wrapped, with
    safetensors' own error kept as the cause."""
    header, body = split_safetensors((checkpoint / "model.safetensors").read_bytes())
    header["model.norm.weight"]["shape"] = [31]
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "model.safetensors").write_bytes(join_safetensors(header, body))
    e = refused(CheckpointError, "could not be read as safetensors", lambda: load_model(tmp_path))
    assert e.__cause__ is not None and "safetensors" in type(e.__cause__).__module__.lower()


@pytest.mark.parametrize("index, match", [
    ({"metadata": {}}, "has no weight_map"),
    ("not json", "is not valid JSON"),
    ({"weight_map": {"model.norm.weight": "../outside.safetensors"}}, "names the shard '../outside.safetensors'"),
    ({"weight_map": {"model.norm.weight": "/etc/passwd"}}, "names the shard '/etc/passwd'"),
])
def test_bad_shard_index(tmp_path, index, match):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    (d / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    (tmp_path / "outside.safetensors").write_bytes(b"never read")
    refused(CheckpointError, match, lambda: load_model(d))


def test_config_json_binary_or_not_an_object(tmp_path, checkpoint):
    d = with_config(tmp_path, checkpoint, "")
    (d / "config.json").write_bytes(b"\xff\xfe\x00binary")
    refused(ConfigError, "is not valid JSON", lambda: load_model(d))
    (d / "config.json").write_text("null")
    refused(ConfigError, "must hold a JSON object", lambda: load_model(d))


def test_broken_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 5}}')
    e = refused(CheckpointError, r"tokenizer in .*tokenizer.json could not be built", lambda: Tokenizer.from_pretrained(tmp_path))
    assert e.__cause__ is not None
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    refused(CheckpointError, "could not be built", lambda: Tokenizer.from_pretrained(tmp_path))


@pytest.mark.parametrize("template, error, match", [
    ("{% for %}", CheckpointError, r"syntax error \(line 1"),
    ("{{ ''.__class__.__mro__ }}", CheckpointError, "sandbox refuses"),
    ("{{ raise_exception('roles must alternate') }}", InputError, "refused the conversation: roles must alternate"),
    ("{{ 1 / 0 }}", CheckpointError, "failed: ZeroDivisionError"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", InputError,
     "more than 1,000,000 steps"),
    ("{{ 'A' * 10**10 }}", InputError, "a value of size 10,000,000,000"),
    ("{{ 'x'|center(10**10) }}", InputError, "a value of size 10,000,000,000"),
    ("{{ ('y' * 100000).join(['x'] * 100000) }}", InputError, "a value of size 10,000,000,000"),
    ("{{ '%9999999999s' % 'x' }}", InputError, "asks for a huge width"),
    ("{{ 7 ** 1000000 }}", InputError, "an integer of about 3,000,000 bits"),
])
def test_chat_template_errors_and_limits(template, error, match):
    e = refused(error, match, lambda: render(template, "tiny.gguf", messages=[{"role": "user", "content": "hi"}]))
    assert "chat template of tiny.gguf" in str(e) and e.__cause__ is not None


def test_chat_template_time_limit(monkeypatch):
    import msrnn.template as template

    monkeypatch.setattr(template, "MAX_SECONDS", 0.05)
    refused(InputError, "ran for more than 0.05 s", lambda: render(
        "{% for i in range(100000) %}{% for j in range(9) %}{{ j }}{% endfor %}{% endfor %}", "t", messages=[]))


def test_a_real_template_still_renders(tiny_gguf):
    tok = Tokenizer.from_pretrained(tiny_gguf[0])
    assert tok.apply_chat_template([{"role": "user", "content": "ab"}] * 3) == "<s>ab</s>" * 3


def test_step_with_text_or_no_tokens(checkpoint):
    model = load_model(checkpoint)
    refused(InputError, "tokens must be integer token ids .* encode text with the tokenizer", lambda: model.step(["a"]))
    refused(InputError, "tokens must be integer ids, got dtype torch.float32", lambda: model.step(torch.tensor([1.5])))
    refused(InputError, r"tokens is empty \(a batch of 0 rows\)", lambda: model.step(torch.tensor([], dtype=torch.long)))


def test_edited_results_file_refused_on_resume(tmp_path):
    path = tmp_path / "results.jsonl"
    bad = dict(UNITS[1], tokens=-3)
    path.write_text("\n".join(json.dumps(x) for x in [{"settings": SETTINGS}, UNITS[0], bad]) + "\n")
    refused(InputError, "unit 3 of .*results.jsonl is not one msrnn wrote", lambda: results_file.load_results(path, SETTINGS, True))
    path.write_text('[1, 2]\n')
    refused(InputError, "does not start with the settings line", lambda: results_file.load_results(path, SETTINGS, True))


# --- the command line: everything else is checked before a policy file runs ------------------------------------
def test_cli_checks_every_argument_before_running_a_policy_file(tmp_path, capsys):
    from msrnn.cli import main

    marker = tmp_path / "ran"
    policy = tmp_path / "evil.py"
    policy.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    text = tmp_path / "t.txt"
    text.write_text("some text")
    out_file = tmp_path / "a-file"
    out_file.write_text("")
    for args, message in [
        (["eval", "ppl", "--text", str(text), "--states", "0", "--policies", f"{policy}:P"], "--states '0'"),
        (["eval", "ppl", "--text", str(text), "--prompt", "99999", "--policies", f"{policy}:P"],
         r"prompt=99999 must be an integer in 0..2047 .* T=2048 tokens"),
        (["eval", "ppl", "--text", str(text), "--out", str(out_file), "--policies", f"{policy}:P"], "is an existing file"),
        (["generate", "hi", "--temperature", "-1", "--policy", f"{policy}:P"], "temperature must be"),
        (["generate", "hi", "--threads", "-1", "--policy", f"{policy}:P"], "--threads -1: give a positive number"),
        (["eval", "stream", "--text", str(tmp_path / "missing.txt"), "--policy", f"{policy}:P"], "no such file"),
        (["bench", "--steps", "0", "--policy", f"{policy}:P"], "--steps: give positive numbers"),
        (["bench", "--budget-states", "0,256", "--policy", f"{policy}:P"], "--budget-states: give positive"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main(args)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("msrnn: error: ") and "{" not in err, err
        assert re.search(message, err), (message, err)
        assert not marker.exists(), f"{args} ran the policy file before refusing"


@pytest.mark.parametrize("spec, match", [("sinks(sinks=2.5)", "sinks=2.5 must be a whole number"),
                                         ("tova-recent(recent=1.5)", "recent=1.5 must be a whole number")])
def test_policy_settings_that_count_tokens_are_whole(spec, match):
    refused(InputError, match, lambda: make_policy(spec, 8))
