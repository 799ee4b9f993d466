"""Where weights come from: a local HF directory, a hub id, or a GGUF file -> a ready `Transformer`.

Checkpoints use Hugging Face parameter names; msrnn fuses q/k/v and gate/up into one matrix each (one matmul instead
of three/two per token), so loading is a renaming plus two concatenations. Pickle checkpoints (.bin, .pt) are refused:
unpickling runs arbitrary code. Only safetensors (and GGUF) are read.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from . import quant
from .config import Config
from .errors import CheckpointError
from .tensors import check_finite, expected_shapes

HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", "chat_template.json"]
FORMATS = {"float32": "fp32", "fp32": "fp32", torch.float32: "fp32", "bfloat16": "bf16", "bf16": "bf16",
           torch.bfloat16: "bf16", "int8": "int8", "int4": "int4", "auto": "auto"}


def parse_format(dtype) -> str:
    """'fp32' | 'bf16' | 'int8' | 'int4' | 'auto' from what a user may pass (a name or a torch dtype)."""
    try:
        return FORMATS[dtype]
    except (KeyError, TypeError):
        raise CheckpointError(f"dtype {dtype!r} is not supported; use fp32 (the exact reference), bf16, int8, int4 "
                              "(weight-only, CPU), or auto (the checkpoint's own precision).") from None


def resolve(source: str | Path | None) -> Path:
    """A local directory or .gguf file as is; anything shaped like 'org/name' through the hub (cache first); None,
    the bundled SmolLM2-135M-Instruct GGUF (works offline)."""
    if source is None:
        from .gguf import bundled_gguf_path

        return bundled_gguf_path()
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if text.endswith(".gguf") or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"{text} does not exist: give a checkpoint directory, a .gguf file or a hub id 'org/name'.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline without a cached copy, unknown repo, no network...
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set and the hub cache has no copy)" if offline else ""
        raise CheckpointError(f"could not get {text!r} from the Hugging Face hub{hint}: {type(e).__name__}: {e}") from None


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = read_index(index)
    elif (directory / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        if pickles:
            raise CheckpointError(
                f"{directory} holds only pickle weights ({', '.join(pickles)}); msrnn never unpickles. Convert once "
                "with transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, "
                "safe_serialization=True), then load out_dir.")
        raise CheckpointError(f"{directory} has no model.safetensors nor model.safetensors.index.json.")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = directory / shard
        if not path.is_file():
            raise CheckpointError(f"shard {shard} listed in model.safetensors.index.json is missing from {directory}.")
        check_safetensors_header(path)
        try:
            part = load_file(str(path))
        except Exception as e:  # safetensors' own errors (and OSError): the header scan above catches the usual ones
            raise CheckpointError(f"{path} could not be read as safetensors ({type(e).__name__}: {e}); the file is "
                                  "damaged: re-download it.") from e
        if twice := sorted(set(part) & set(tensors)):
            raise CheckpointError(f"{path} holds {twice[0]!r}, which another shard holds too; re-download the "
                                  "checkpoint.")
        check_finite(path, part)
        tensors.update(part)
    return tensors


# --- checks on checkpoint files (kept apart from the loading above) ----------------------------------------------
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def read_index(index: Path) -> list[str]:
    """The shard files named by model.safetensors.index.json, each confined to the checkpoint directory: a name
    like "../outside.safetensors" or "/etc/x" would read a file the checkpoint does not own. (Checked on the names,
    not resolved paths: the hub cache links each shard to a blob outside the snapshot folder, legitimately.)"""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index} is not valid JSON ({e}); re-download it.") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index} has no weight_map (a JSON object {{tensor name: shard file}}); the index is "
                              "damaged: re-download it.")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        parts = Path(shard).parts
        if not parts or Path(shard).is_absolute() or ".." in parts or not shard.endswith(".safetensors"):
            raise CheckpointError(f"{index} names the shard {shard!r}, which is not a .safetensors file inside the "
                                  "checkpoint directory; msrnn reads no file outside it. Fix or re-download the index.")
    return shards


def check_safetensors_header(path: Path) -> None:
    """The cheap checks of a safetensors file, on its header alone: it is complete (the usual interrupted download),
    its header is JSON of a sane size, and every tensor is floating point. Raises CheckpointError naming the fix."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is not None and n > MAX_HEADER:
            raise CheckpointError(f"{path} claims a header of {n:,} bytes (safetensors allows {MAX_HEADER:,}): it is "
                                  "not a safetensors file, or it is damaged; re-download it.")
        if n is None or 8 + n > size:
            raise CheckpointError(f"{path} is truncated ({size:,} bytes, shorter than its own header says): "
                                  "re-download it.")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: its header is not JSON ({e}); the file is damaged or not safetensors: "
                                  "re-download it.") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: its header is not a JSON object; the file is damaged: re-download it.")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{path}: the header entry of {name!r} is damaged; re-download the file.")
        if info.get("dtype") not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} is stored as {info.get('dtype')!r}; model weights must be "
                                  f"floating point ({', '.join(FLOAT_DTYPES)}). Quantized (integer) checkpoints are "
                                  "not supported: use the float original.")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: its tensors need {8 + n + end:,} bytes, the file has {size:,}; "
                              "re-download it.")


def to_msrnn(cfg: Config, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check HF-named tensors against the config and rename/fuse them into msrnn's state_dict."""
    hf = dict(hf)
    if cfg.tie_word_embeddings:
        hf.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(hf))
    unexpected = sorted(set(hf) - set(want) - {k for k in hf if k.endswith("rotary_emb.inv_freq")})
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:5])}"
                              + (" ..." if len(missing) > 5 else "") + "; does config.json match the weights?")
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:5])}"
                              + (" ..." if len(unexpected) > 5 else "") + "; does config.json match the weights?")
    for name, shape in want.items():
        if tuple(hf[name].shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(hf[name].shape)}, the config implies {shape}.")
    out = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    for n in range(cfg.num_hidden_layers):
        p, a, m = f"model.layers.{n}.", f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp."
        o = f"layers.{n}."
        out[o + "attn_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[o + "mlp_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        out[o + "o.weight"] = hf[a + "o_proj.weight"]
        out[o + "down.weight"] = hf[m + "down_proj.weight"]
        out[o + "qkv.weight"] = quant.cat([hf[a + f"{x}_proj.weight"] for x in "qkv"])  # GGUF codes stack too
        if cfg.attention_bias:
            out[o + "qkv.bias"] = torch.cat([hf[a + f"{x}_proj.bias"] for x in "qkv"])
        if cfg.attention_bias:
            out[o + "o.bias"] = hf[a + "o_proj.bias"]
        out[o + "gate_up.weight"] = quant.cat([hf[m + f"{x}_proj.weight"] for x in ("gate", "up")])
        if cfg.mlp_bias:
            out[o + "gate_up.bias"] = torch.cat([hf[m + f"{x}_proj.bias"] for x in ("gate", "up")])
        if cfg.mlp_bias:
            out[o + "down.bias"] = hf[m + "down_proj.bias"]
    return out


def build(cfg: Config, hf_tensors: dict, fmt: str, identity: str):
    """A ready `Transformer` from HF-named tensors (float, or `quant.Codes` from a GGUF file) in format fmt.

    Every linear layer is made by `quant.linear` in its format. With int weights only the matrix products read int
    codes and bf16 activations: everything around them (norms, RoPE, attention, the state) stays fp32, which on a
    CPU is both faster than bf16 for these small ops and closer to the reference. A tied lm_head becomes its own int
    copy of the embedding, which stays a float table for the lookup."""
    from .model import Transformer

    sd = to_msrnn(cfg, hf_tensors)
    coded = any(isinstance(w, quant.Codes) for w in sd.values())
    compute = "bf16" if fmt == "bf16" else "fp32"  # int kernels take bf16 in, give bf16 out; around them: fp32
    dtype = torch.float32 if compute == "fp32" else torch.bfloat16
    with torch.device("meta"):
        model = Transformer(cfg)
    linears = [f"layers.{n}.{part}" for n in range(cfg.num_hidden_layers) for part in ("qkv", "o", "gate_up", "down")]
    if "lm_head.weight" not in sd and (fmt in ("int8", "int4") or coded):  # int weights: a tied head gets an int copy
        sd["lm_head.weight"] = sd["embed.weight"]
    if "lm_head.weight" in sd:
        linears.append("lm_head")
    formats = {name: quant.native_format(sd[name + ".weight"], compute) if fmt == "auto" else fmt for name in linears}
    embed = sd["embed.weight"]
    if isinstance(embed, quant.Codes):  # the lookup table is float; a tied int head keeps the file's codes
        sd["embed.weight"] = embed.dequantize()
    for name in linears:
        w, bias = sd.pop(name + ".weight"), sd.pop(name + ".bias", None)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, quant.linear(formats[name], w, bias))
    sd = {k: (v.dequantize() if isinstance(v, quant.Codes) else v).to(dtype) for k, v in sd.items()}  # embed, norms
    model.load_state_dict(sd, assign=True, strict=False)
    left = [k for k, v in model.state_dict().items() if v.is_meta]
    if left:  # every tensor must have come from the checkpoint
        raise CheckpointError(f"internal: no weights for {', '.join(left[:5])}")
    # The name says where the weights came from; the fingerprint (config + a few embedding values) tells apart two
    # checkpoints that share a name, so a saved state is never continued by a model that did not make it.
    embed = hf_tensors["model.embed_tokens.weight"]
    embed = embed.rows(lambda t: t[:2]).dequantize() if isinstance(embed, quant.Codes) else embed
    probe = json.dumps(cfg.__dict__, sort_keys=True, default=str).encode() + embed[:2, :8].to(
        torch.bfloat16).float().numpy().tobytes()  # bf16-rounded: same for either dtype
    model.identity = f"{identity}#{hashlib.sha1(probe).hexdigest()[:12]}"
    return model.eval().requires_grad_(False)


def load_model(source: str | Path | None = None, dtype: torch.dtype | str = torch.float32):
    """`Transformer` from a checkpoint directory, a hub id, a .gguf file, or (None) the bundled SmolLM2 GGUF.

    dtype: 'fp32' (the exact reference, default), 'bf16', 'int8' / 'int4' (weight-only: matrices quantized at load,
    or taken as they are from a GGUF file's Q4/Q8 blocks; the model then computes in bf16, on the CPU), or 'auto' (the
    checkpoint's own precision: a GGUF's Q4_0/Q4_1 matrices as int4, Q8_0 as int8; a safetensors checkpoint's
    config torch_dtype)."""
    fmt = parse_format(dtype)
    path = resolve(source)
    if path.is_file():
        if path.suffix != ".gguf":
            if path.suffix in (".bin", ".pt", ".pth", ".pkl"):
                raise CheckpointError(f"{path} is a pickle checkpoint; msrnn never unpickles. Convert it to safetensors "
                                      "(transformers: save_pretrained(out_dir, safe_serialization=True)).")
            raise CheckpointError(f"{path} is a file msrnn cannot load: give a directory with config.json or a .gguf file.")
        from .gguf import read_gguf

        config, tensors = read_gguf(path, codes=fmt in ("int4", "int8", "auto"))
        return build(Config.from_dict(config), tensors, fmt, identity=f"gguf:{path.name}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: is this a Hugging Face checkpoint directory?")
    cfg = Config.from_json(path / "config.json")
    if fmt == "auto":  # the precision the checkpoint was saved in
        saved = json.loads((path / "config.json").read_text())
        saved = saved.get("dtype") or saved.get("torch_dtype")
        fmt = "bf16" if saved == "bfloat16" else "fp32"
    return build(cfg, read_safetensors(path), fmt, identity=f"dir:{path.resolve().name}")


def load(source: str | Path | None = None, dtype: torch.dtype | str = torch.float32):
    """(model, tokenizer) from one source; None is the bundled SmolLM2-135M-Instruct GGUF (works offline)."""
    from .tokenizer import Tokenizer

    path = resolve(source)
    return load_model(path, dtype=dtype), Tokenizer.from_pretrained(path)
