"""msrnn and kvpress side by side: the same model, the same tokens, the same policy, PPL and ms/token in one run.

kvpress is not a dependency of msrnn and its pins do not fit msrnn's (kvpress 0.5.5 wants transformers < 5.3; msrnn
is tested with 5.24), so this runs in a throwaway environment of its own (docs/results/kvpress/README.md):

    python -m venv /tmp/kvenv && echo $SHARED_SITE_PACKAGES > /tmp/kvenv/lib/python3.11/site-packages/shared.pth
    /tmp/kvenv/bin/pip install kvpress==0.5.5 "transformers==5.2.0" datasets pandas peft -c constraints.txt
    PYTHONPATH=. /tmp/kvenv/bin/python benchmarks/kvpress_side_by_side.py --out docs/results/kvpress

The setting is kvpress's own: a prompt of P tokens is read in one pass and compressed ONCE to k states per layer
(and kv head) by the press; the next D tokens are then decoded (teacher-forced) with the cache growing, no more
eviction. msrnn does the same with `model.prefill(prompt, policy=..., mode="fast")` (one parallel pass, one
eviction to k) and then `model.step(token, state, None)` (unbounded from there). Both score the D tokens after
the prompt. The model is the bundled SmolLM2-135M GGUF, read by transformers (for kvpress) and by msrnn, fp32, CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch

import msrnn
from msrnn.gguf import bundled_gguf_path
from msrnn.policies import make_policy

# msrnn policy -> kvpress press (class name, settings) doing the same selection once after a prompt
PAIRS = {
    "sinks": ("StreamingLLMPress", {"n_sink": 4}),  # msrnn sinks: 4 sink tokens + the newest k - 4
    "snapkv(window=32)": ("SnapKVPress", {"window_size": 32, "kernel_size": 5}),
    "tova": ("TOVAPress", {}),  # kvpress's TOVA also protects the newest token (msrnn's does not)
    "keydiff": ("KeyDiffPress", {}),
}


def text_tokens(tok, path: Path, chunks: int, length: int) -> torch.Tensor:
    """`chunks` windows of `length` tokens spread evenly over the text (as msrnn eval's pick_chunks)."""
    from msrnn.eval import pick_chunks

    return pick_chunks(tok.encode(path.read_text(encoding="utf-8")), length, chunks)[0]


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")  # (n,)


@torch.inference_mode()
def run_msrnn(model, ids: torch.Tensor, P: int, policy) -> tuple[torch.Tensor, float]:
    """Losses of tokens P..T-1 and ms per decoded token: fast prefill with one eviction, then unbounded steps."""
    logits, state = model.prefill(ids[None, :P], policy=policy, mode="fast")
    losses, t0 = [nll(logits, ids[P : P + 1])], time.perf_counter()
    for t in range(P, len(ids) - 1):
        logits, state = model.step(ids[t : t + 1], state, None)
        losses.append(nll(logits, ids[t + 1 : t + 2]))
    return torch.cat(losses), (time.perf_counter() - t0) * 1000 / max(len(ids) - 1 - P, 1)


@torch.inference_mode()
def run_kvpress(hf, ids: torch.Tensor, P: int, press) -> tuple[torch.Tensor, float]:
    """The same with kvpress: the press compresses the prompt's cache during the prefill (its forward hooks), and
    decoding continues with explicit positions, as kvpress's own pipeline does."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with press(hf) if press is not None else contextlib.nullcontext():  # None: the full model
        logits = hf(ids[None, :P], past_key_values=cache, use_cache=True).logits[0, -1:]
    losses, t0 = [nll(logits, ids[P : P + 1])], time.perf_counter()
    for t in range(P, len(ids) - 1):
        out = hf(ids[None, t : t + 1], past_key_values=cache, position_ids=torch.tensor([[t]]), use_cache=True)
        losses.append(nll(out.logits[0, -1:], ids[t + 1 : t + 2]))
    return torch.cat(losses), (time.perf_counter() - t0) * 1000 / max(len(ids) - 1 - P, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", default="/work/shared/data/frankenstein.txt")
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512, help="P: tokens compressed once")
    ap.add_argument("--decode", type=int, default=128, help="D: tokens decoded and scored after the prompt")
    ap.add_argument("--states", type=int, default=128, help="k: states per layer kept from the prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/results/kvpress")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import kvpress
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading bars: hundreds of lines

    gguf = bundled_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    model, tok = msrnn.load(dtype="fp32")
    P, k = args.prompt, args.states
    data = text_tokens(tok, Path(args.text), args.chunks, P + args.decode)
    with torch.inference_mode():  # the two models agree before any policy (the same weights, read twice)
        gap = (hf(data[:1]).logits - model(data[:1])).abs().max().item()
    rows = []
    for name, (press_name, settings) in {"full": (None, {}), **PAIRS}.items():
        row = {"policy": name, "press": press_name or "none"}
        for impl in ("msrnn", "kvpress"):
            losses, ms = [], []
            for ids in data:
                try:
                    if impl == "msrnn":
                        loss, m = run_msrnn(model, ids, P, make_policy(name, k) if name != "full" else None)
                    elif press_name is None:
                        loss, m = run_kvpress(hf, ids, P, None)
                    else:
                        press = getattr(kvpress, press_name)(compression_ratio=1 - k / P, **settings)
                        loss, m = run_kvpress(hf, ids, P, press)
                except Exception as e:  # a press that fails is reported in the table, not hidden
                    row[f"{impl}_error"] = f"{type(e).__name__}: {e}"[:300]
                    break
                losses.append(loss)
                ms.append(m)
            if f"{impl}_error" not in row:
                row[f"{impl}_ppl"] = math.exp(float(torch.cat(losses).double().mean()))
                row[f"{impl}_ms_per_token"] = sum(ms) / len(ms)
        rows.append(row)
        print(row, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"text": Path(args.text).name, "chunks": args.chunks, "prompt": P, "decode": args.decode,
                "states": k, "threads": args.threads, "kvpress": kvpress.__version__ if hasattr(kvpress, "__version__")
                else "0.5.5", "transformers": transformers.__version__, "torch": torch.__version__,
                "max_logit_gap_full_model": gap}
    (out / "results.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    lines = ["| msrnn policy | kvpress press | PPL msrnn | PPL kvpress | ms/token msrnn | ms/token kvpress |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        cell = lambda impl, key, fmt: fmt.format(r[f"{impl}_{key}"]) if f"{impl}_{key}" in r else "error"  # noqa
        lines.append(f"| {r['policy']} | {r['press']} | {cell('msrnn', 'ppl', '{:.3f}')} | "
                     f"{cell('kvpress', 'ppl', '{:.3f}')} | {cell('msrnn', 'ms_per_token', '{:.1f}')} | "
                     f"{cell('kvpress', 'ms_per_token', '{:.1f}')} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
