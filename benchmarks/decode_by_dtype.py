"""Batch-1 decode at every weight format against that format's own floor, eager and compiled, on the bundled model.

    python benchmarks/decode_by_dtype.py --threads 2 [--dtypes fp32,bf16,int8,int4,auto] [--positions 16,512]

For each --dtype: the model loaded in that format, its floor (`bench.floor_chain`: one token's chained matrix-vector
products over the same weights in the same formats, nothing else), and msrnn's unbounded decode step at each stream
position, eager and compiled (`Transformer.compile`, inductor), all timed in turn (round-robin), medians. Prints a
markdown table of ms/token and each step's ratio to its floor (issue 14's target: <= 1.3x). The first compiled
steps of each format take tens of seconds (they fall in the warm-up)."""
from __future__ import annotations

import argparse

import torch

import msrnn
from msrnn.bench import floor_chain, msrnn_decoder, side_by_side


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="fp32,bf16,int8,int4,auto")
    ap.add_argument("--positions", default="16,512")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    positions = [int(p) for p in args.positions.split(",")]
    print(f"| {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads | floor ms | "
          + " | ".join(f"at {p}: eager ms (x floor) | compiled ms (x floor)" for p in positions) + " |")
    print("|---|---:|" + "---:|---:|" * len(positions))
    for dtype in args.dtypes.split(","):
        model, _ = msrnn.load(dtype=dtype)
        compiled = [block.compiled for block in model.compile().layers]

        def use(on: bool, fn):
            def run():
                for block, step in zip(model.layers, compiled):
                    block.compiled = step if on else None
                fn()
            return run

        runs = {"floor": floor_chain(model)}
        for p in positions:
            decoder = msrnn_decoder(model, None, p, args.steps)
            runs[f"eager {p}"], runs[f"compiled {p}"] = use(False, decoder), use(True, decoder)
        t = side_by_side(runs, args.rounds)
        floor = t["floor"] * 1000
        cells = []
        for p in positions:
            eager, comp = (t[f"{kind} {p}"] * 1000 / args.steps for kind in ("eager", "compiled"))
            cells.append(f"{eager:.1f} ({eager / floor:.2f}x) | {comp:.1f} ({comp / floor:.2f}x)")
        print(f"| {dtype} | {floor:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
