"""`msrnn info`: what a checkpoint is and what its multi-state costs per token and per budget."""
from __future__ import annotations

from . import quant
from .report import human_bytes

INFO_BUDGETS = (64, 256, 512, 1024, 2048)


def model_info(model) -> dict:
    """What a model is and what its multi-state costs: per token, for typical budgets, and at full context."""
    cfg = model.cfg
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize  # k + v
    budgets = sorted({*INFO_BUDGETS, cfg.max_position_embeddings})
    return {
        "source": model.identity,
        "config": cfg.to_dict(),
        "parameters": parameters(model),
        "dtype": str(model.dtype).removeprefix("torch."),  # of the activations and the state
        "weights": quant.weight_format(model),
        "weight_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
        "state_bytes_per_token": per_token,
        "state_bytes": {k: k * per_token for k in budgets},
    }


def parameters(model) -> int:
    """Weights of the checkpoint: int layers hold theirs as buffers; a tied embedding counts once (int weights keep
    a copy of it as the output layer)."""
    n = sum(p.numel() for p in model.parameters())
    for name, m in model.named_modules():
        if isinstance(m, quant.INT_LAYERS) and not (name == "lm_head" and model.cfg.tie_word_embeddings):
            n += m.out_features * m.in_features
    return n


def info(model) -> str:
    """`model_info` as the text `msrnn info` prints."""
    d = model_info(model)
    cfg = d.pop("config")
    rope = cfg.pop("rope")
    lines = [f"source: {d['source'] or '(in memory)'}",
             f"parameters: {d['parameters']:,} (weights {d['weights']}, {human_bytes(d['weight_bytes'])} in memory; "
             f"activations and state {d['dtype']})"]
    lines += [f"{k}: {v}" for k, v in cfg.items()]
    scaling = {k: v for k, v in rope.items() if v is not None and k != "theta"} if rope["type"] != "default" else {}
    lines += ["rope: " + ", ".join(f"{k}={v}" for k, v in {"theta": rope["theta"], **scaling}.items())]
    lines += ["", f"state per token (keys + values, {cfg['num_hidden_layers']} layers): "
                  f"{human_bytes(d['state_bytes_per_token'])}"]
    full = cfg["max_position_embeddings"]
    for k, n in d["state_bytes"].items():
        note = "  (max_position_embeddings: the unbounded transformer at full context)" if k == full else ""
        lines.append(f"  {k:>7,} states: {human_bytes(n):>10}{note}")
    return "\n".join(lines)


def run_info(args, load) -> None:
    """`msrnn info`; `load()` gives (model, tokenizer)."""
    print(info(load()[0]))
