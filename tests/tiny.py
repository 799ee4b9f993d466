"""Tiny random Llama/Mistral checkpoints built with transformers (the oracle) in milliseconds, for tests."""
from __future__ import annotations

import functools
import os

import torch

DEFAULTS = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=97, max_position_embeddings=128)


def hf_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A random transformers model in fp32 with eager attention. Norm weights are random too (a missing or
    misplaced RMSNorm must change the logits)."""
    import transformers

    kwargs = {**DEFAULTS, **overrides}
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[model_type]  # Qwen2: msrnn.hf tests only
    cls_cfg, cls_model = getattr(transformers, prefix + "Config"), getattr(transformers, prefix + "ForCausalLM")
    if model_type == "mistral":
        kwargs.setdefault("sliding_window", None)
    cfg = cls_cfg(attn_implementation="eager", **kwargs)
    torch.manual_seed(seed)
    model = cls_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.15)  # larger than the init std, so attention is far from uniform
    return model


def save(model, directory, shard: str | None = None) -> str:
    os.makedirs(directory, exist_ok=True)
    if shard:
        model.save_pretrained(directory, max_shard_size=shard)
    else:
        model.save_pretrained(directory)
    return str(directory)


def hf_scan(model, tokens: torch.Tensor, drop=None) -> torch.Tensor:
    """transformers run one token at a time with its own DynamicCache, explicit position_ids: logits (B, T, V).

    drop(layer, keys, values, attentions) -> (keys, values) may remove cache entries after every step, which is how
    a bounded policy is checked against transformers."""
    from transformers import DynamicCache

    B, T = tokens.shape
    cache = DynamicCache(config=model.config)
    out = []
    with torch.no_grad():
        for t in range(T):
            res = model(tokens[:, t : t + 1], position_ids=torch.full((B, 1), t), cache=cache, use_cache=True,
                        output_attentions=drop is not None)
            out.append(res.logits[:, -1])
            if drop is not None:
                for i, layer in enumerate(cache.layers):
                    layer.keys, layer.values = drop(i, layer.keys, layer.values, res.attentions[i])
    return torch.stack(out, dim=1)


def _any_model_policies() -> list[str]:
    """The built-in policies that run on any model: `retrieval` reads a calibration of one model (the bundled
    SmolLM2's by default) and is tested with calibrations of the tiny models in tests/test_retrieval.py."""
    from msrnn.policies import POLICIES

    return [name for name in POLICIES if name != "retrieval"]


def cache_policies() -> list[str]:
    """The built-in policies a transformers cache can run (msrnn.hf.PolicyCache): `surprise` reads the model's
    logits, which a cache never sees (refused there, tests/test_surprise.py)."""
    return [name for name in _any_model_policies() if name != "surprise"]


POLICY_NAMES = _any_model_policies()


@functools.lru_cache
def schemes(name: str) -> list[str]:
    """The position schemes policy `name` accepts (expected-attention refuses those that rotate keys at use)."""
    from msrnn.errors import MsrnnError
    from msrnn.policies import POSITION_SCHEMES, make_policy

    def accepts(scheme):
        try:
            make_policy(name, 64, positions=scheme)
            return True
        except MsrnnError:
            return False

    return [s for s in POSITION_SCHEMES if accepts(s)]
