"""A checkpoint's config.json, read into one validated dataclass.

Only what the Llama/Mistral forward pass needs is kept. Anything msrnn cannot build faithfully (another model type,
another activation, a RoPE variant we do not implement) is refused here, with a ConfigError that says so, instead of
producing a model that silently computes something else.
"""
from __future__ import annotations

import dataclasses
import json
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
        """Build from a Hugging Face config.json dict (old `rope_scaling` or new `rope_parameters` style)."""
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported: msrnn implements {', '.join(MODEL_TYPES)} "
                "(decoder-only Llama/Mistral checkpoints)."
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported: Llama/Mistral use 'silu'.")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(d.get(key), int) or d[key] < 1:
                raise ConfigError(f"config.json needs a positive integer {key!r}, got {d.get(key)!r}.")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ConfigError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}; "
                "grouped-query attention needs every kv head to serve the same number of query heads."
            )
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        if head_dim % 2:
            raise ConfigError(f"head_dim={head_dim} must be even: RoPE rotates pairs of dimensions.")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError("pretraining_tp > 1 is not supported; re-save the checkpoint with pretraining_tp=1.")
        eos = d.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        window = d.get("sliding_window") if model_type == "mistral" else None
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ConfigError(f"sliding_window must be a positive integer or null, got {window!r}.")
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=window,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            rope=_rope_from_dict(d),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist: a checkpoint directory needs a config.json.") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}).") from None
        return cls.from_dict(d)


def _rope_from_dict(d: dict) -> RopeConfig:
    """RoPE settings from `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling` (older files)."""
    params = d.get("rope_parameters")
    if params is None:
        params = dict(d.get("rope_scaling") or {})
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
    factor = float(params.get("factor", 1.0))
    if rope_type != "default" and factor < 1.0:
        raise ConfigError(f"rope scaling factor must be >= 1, got {factor}.")
    original = params.get("original_max_position_embeddings")
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in params:
                raise ConfigError(f"llama3 rope scaling needs {key!r} in rope_scaling / rope_parameters.")
        if params["high_freq_factor"] <= params["low_freq_factor"]:
            raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor.")
    return RopeConfig(
        theta=float(params.get("rope_theta", d.get("rope_theta", 10000.0))),
        type=rope_type,
        factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original) if original is not None else None,
    )
