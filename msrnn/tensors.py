"""What a checkpoint's tensors must be, wherever they come from (safetensors, GGUF): the names and shapes a config
implies (`expected_shapes`, Hugging Face Llama names) and finite values (`check_finite`). Below weights.py and gguf.py,
which both check with these."""
from __future__ import annotations

import torch

from . import quant
from .config import Config
from .errors import CheckpointError


def check_finite(path, tensors: dict[str, torch.Tensor]) -> None:
    """No weight is NaN or infinite (a damaged file, or a conversion that overflowed float16). aminmax propagates
    NaN and is ~30x faster than isfinite(t).all() (no boolean copy of the tensor)."""
    for name, w in tensors.items():
        for t in (w.scale, w.offset) if isinstance(w, quant.Codes) else (w,):  # a GGUF block's codes are finite
            if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()):
                continue
            lo, hi = torch.aminmax(t)
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values; the file is damaged (or "
                                      "was converted with an overflow): re-download or re-convert it.")


def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face Llama/Mistral checkpoint of this config holds, with its shape."""
    d, hd, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
                 "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
                 "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
                 "mlp.gate_proj.weight": (i, d), "mlp.up_proj.weight": (i, d), "mlp.down_proj.weight": (d, i)}
        if cfg.attention_bias:
            layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                          "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (d,)})
        if cfg.mlp_bias:
            layer.update({"mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,), "mlp.down_proj.bias": (d,)})
        shapes.update({p + k: v for k, v in layer.items()})
    return shapes
