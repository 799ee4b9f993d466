"""A checkpoint's config.json, read into one validated dataclass.

Only what the Llama/Mistral forward pass needs is kept. Anything msrnn cannot build faithfully (another model type,
another activation, a RoPE variant we do not implement) is refused here, with a ConfigError that says so, instead of
producing a model that silently computes something else.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

MODEL_TYPES = ("llama", "mistral")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: base `theta` and an optional scaling rule (see rope.py)."""

    theta: float = 10000.0
    type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0  # linear / dynamic / llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int | None = None  # llama3


@dataclass(frozen=True)
class Config:
    model_type: str
    vocab_size: int
    hidden_size: int  # d
    intermediate_size: int  # the MLP's inner width
    num_hidden_layers: int
    num_attention_heads: int  # H query heads
    num_key_value_heads: int  # Hkv key/value heads; H % Hkv == 0 (GQA; Hkv == 1 is MQA)
    head_dim: int  # hd; may differ from d / H, then o_proj is not square
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: key j visible to query i iff 0 <= i - j < sliding_window
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    rope: RopeConfig = field(default_factory=RopeConfig)

    @property
    def group_size(self) -> int:
        """G = H / Hkv: query head h reads kv head h // G."""
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Build from a Hugging Face config.json dict (old `rope_scaling` or new `rope_parameters` style). Every field
        is type- and range-checked here, once, so that nothing downstream meets a zero, a NaN or a string."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object (a dict of settings), got {type(d).__name__}.")
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported: msrnn implements {', '.join(MODEL_TYPES)} "
                "(decoder-only Llama/Mistral checkpoints)."
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported: Llama/Mistral use 'silu'.")
        sizes = {key: _int(d, key, hi) for key, hi in LIMITS.items()}
        heads = sizes["num_attention_heads"]
        kv_heads = _int(d, "num_key_value_heads", heads, default=heads)
        if heads % kv_heads:
            raise ConfigError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}; "
                "grouped-query attention needs every kv head to serve the same number of query heads."
            )
        head_dim = _int(d, "head_dim", 4096, default=sizes["hidden_size"] // heads or None)
        if head_dim % 2:
            raise ConfigError(f"head_dim={head_dim} must be even: RoPE rotates pairs of dimensions.")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError("pretraining_tp > 1 is not supported; re-save the checkpoint with pretraining_tp=1.")
        eos = d.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        vocab = sizes["vocab_size"]
        bos = d.get("bos_token_id")
        for name, ids in (("eos_token_id", eos), ("bos_token_id", () if bos is None else (bos,))):
            if not all(_is_int(i) and 0 <= i < vocab for i in ids):
                raise ConfigError(f"{name} {ids if len(ids) != 1 else ids[0]!r} is not a token id of a vocabulary of "
                                  f"{vocab}; fix config.json (ids in 0..{vocab - 1}, or null).")
        window = d.get("sliding_window") if model_type == "mistral" else None
        if window is not None and (not _is_int(window) or window < 1):
            raise ConfigError(f"sliding_window must be a positive integer or null, got {window!r}.")
        eps = _float(d, "rms_norm_eps", 1e-6)
        if not 0 < eps < 1:
            raise ConfigError(f"rms_norm_eps={eps} must be in (0, 1): RMSNorm divides by sqrt(mean(x^2) + eps).")
        return cls(
            model_type=model_type,
            vocab_size=vocab,
            hidden_size=sizes["hidden_size"],
            intermediate_size=sizes["intermediate_size"],
            num_hidden_layers=sizes["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=eps,
            max_position_embeddings=_int(d, "max_position_embeddings", 2**24, default=2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=window,
            bos_token_id=bos,
            eos_token_id=eos,
            rope=rope_from_dict(d),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist: a checkpoint directory needs a config.json.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}).") from e
        return cls.from_dict(d)


# Upper bounds far above any real checkpoint (Llama-3-405B: 126 layers, 16,384 wide, 128k vocabulary): a config
# past them is corrupt or hostile, and is refused before anything of that size is allocated.
LIMITS = {"vocab_size": 2**22, "hidden_size": 2**16, "intermediate_size": 2**19, "num_hidden_layers": 1024,
          "num_attention_heads": 1024}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int(d: dict, key: str, hi: int, default=None) -> int:
    """A positive integer setting <= hi (a missing or null one takes `default`, if there is one)."""
    value = d.get(key)
    if value is None and default is not None:
        return default
    if not _is_int(value) or not 1 <= value <= hi:
        raise ConfigError(f"config.json needs {key!r} as an integer in 1..{hi:,}, got {value!r}; the checkpoint's "
                          "config is damaged or not a Llama/Mistral config.")
    return value


def _float(d: dict, key: str, default: float, source: dict | None = None) -> float:
    """A finite number setting (JSON numbers only: "1e-5" as a string is refused, not guessed)."""
    value = (source if source is not None else d).get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"config.json needs {key!r} as a finite number, got {value!r}.")
    return float(value)


def rope_from_dict(d: dict) -> RopeConfig:
    """RoPE settings from `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling` (older files)."""
    params = d.get("rope_parameters")
    if params is None:
        scaling = d.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise ConfigError(f"rope_scaling must be a dict or null, got {scaling!r}.")
        params = dict(scaling or {})
        params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    if not isinstance(params, dict):
        raise ConfigError(f"rope_parameters must be a dict, got {params!r}.")
    if "full_attention" in params and isinstance(params["full_attention"], dict):  # per-layer-type form
        params = params["full_attention"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"rope type {rope_type!r} is not supported: msrnn implements {', '.join(ROPE_TYPES)}."
        )
    factor = _float(d, "factor", 1.0, source=params)
    if rope_type != "default" and factor < 1.0:
        raise ConfigError(f"rope scaling factor must be >= 1, got {factor}.")
    theta = _float(d, "rope_theta", d.get("rope_theta", 10000.0), source=params)
    if theta <= 1:
        raise ConfigError(f"rope_theta={theta} must be > 1: it is the base of RoPE's wavelengths (10000 typical).")
    original = params.get("original_max_position_embeddings")
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in params:
                raise ConfigError(f"llama3 rope scaling needs {key!r} in rope_scaling / rope_parameters.")
        if _float(d, "high_freq_factor", 4.0, params) <= _float(d, "low_freq_factor", 1.0, params):
            raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor.")
        if not _is_int(original) or original < 1:
            raise ConfigError(f"original_max_position_embeddings must be a positive integer, got {original!r}.")
    return RopeConfig(
        theta=theta,
        type=rope_type,
        factor=factor,
        low_freq_factor=_float(d, "low_freq_factor", 1.0, params),
        high_freq_factor=_float(d, "high_freq_factor", 4.0, params),
        original_max_position_embeddings=original if rope_type == "llama3" else None,
    )
