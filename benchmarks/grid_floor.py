"""The default `msrnn eval ppl` grid against its matrix-product floor, measured in the same process.

    python benchmarks/grid_floor.py --text ../shared/data/frankenstein.txt [--context 2048 --chunks 2] [--threads 2]

Runs what `msrnn eval ppl` computes with its defaults (the reference pass of the full model, then every policy x
budget cell of each batch of chunks in one batch state: msrnn/ppl.py::run_grid), with a hook on every linear layer
that records the shape of each call it makes. The floor is then those same products and nothing else: one
F.linear per call, (rows, in) x (out, in), on random weights of the model's dtype, each distinct shape timed
(the fastest of a few) and multiplied by how often the grid called it. No evaluation can do its matrix products in less,
so grid / floor says what everything else costs (the token-by-token scan, the policies, the measures). Also printed:
the time the grid spent inside its linear layers, which says whether its products ran at the floor's rate.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
import torch.nn.functional as F

import msrnn
from msrnn.eval import pick_chunks
from msrnn.grid import parse_grid
from msrnn.ppl import DEFAULT_BATCH, DEFAULT_POLICIES, run_grid
from msrnn.quant import LINEARS


def watch(model):
    """Hooks on every linear layer: Counter of call shapes (rows, in, out), and the seconds spent inside them."""
    calls, inside = Counter(), [0.0]

    def before(module, args):
        module._t0 = time.perf_counter()

    def after(module, args, out):
        inside[0] += time.perf_counter() - module._t0
        x = args[0]
        calls[(x.numel() // x.shape[-1], x.shape[-1], out.shape[-1])] += 1

    for m in model.modules():
        if isinstance(m, LINEARS):
            m.register_forward_pre_hook(before)
            m.register_forward_hook(after)
    return calls, inside


def floor_seconds(calls: Counter, dtype, repeats: int = 5) -> float:
    """The products alone: each distinct (rows, in, out) timed (the fastest of `repeats`: a floor), times its count."""
    total = 0.0
    for (rows, k, n), count in calls.items():
        x, w = torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        F.linear(x, w)  # warm-up: first touch of the buffers
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            F.linear(x, w)
            times.append(time.perf_counter() - t0)
        total += min(times) * count
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", required=True)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--policies", default=DEFAULT_POLICIES)
    ap.add_argument("--states", default="64,128,256,512")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = msrnn.load(dtype="fp32")  # eval's default dtype
    data, _ = pick_chunks(tok.encode(open(args.text, encoding="utf-8").read()), args.context, args.chunks)
    names, budgets = parse_grid(args.policies, args.states)
    calls, inside = watch(model)
    t0 = time.perf_counter()
    run_grid(model, data, names, budgets, "exact", 0, DEFAULT_BATCH, {}, lambda unit: None)
    grid = time.perf_counter() - t0
    floor = floor_seconds(calls, model.dtype)
    flops = sum(2 * rows * k * n * c for (rows, k, n), c in calls.items())
    print(f"grid: {len(names)} policies x {budgets} on {len(data)} x {args.context} tokens, {args.threads} threads, fp32")
    print(f"\n| | seconds | x floor |\n|---|---:|---:|")
    print(f"| the grid (reference + every cell) | {grid:.1f} | {grid / floor:.2f} |")
    print(f"| inside its linear layers | {inside[0]:.1f} | {inside[0] / floor:.2f} |")
    print(f"| floor: the same products alone ({flops / 1e12:.1f} TFLOP, {flops / floor / 1e9:.0f} GFLOP/s) | "
          f"{floor:.1f} | 1.00 |")


if __name__ == "__main__":
    main()
