"""The layer-major scan against the parallel forward of the same chunk, timed in turn on the bundled model.

    python benchmarks/scan.py --text ../shared/data/frankenstein.txt --tokens 1024 --policy tova --states 128

Times, on the same tokens and in alternating rounds (a machine whose speed drifts slows all alike): the unbounded
parallel forward `model(ids)`; `prefill(mode="exact")` (the recurrence, run layer-major in chunks of --chunk tokens);
`prefill(mode="fast")`; and, with --token-major, the same exact recurrence stepped token by token (slow: for the
ratio). Prints a markdown table of medians and ratios to the parallel forward, and checks that the scan and the
token-by-token recurrence kept the same states (with --token-major)."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import msrnn
from msrnn.policies import make_policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--states", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--token-major", action="store_true", help="also time the token-by-token recurrence")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = msrnn.load()
    text = open(args.text, encoding="utf-8").read()
    ids = torch.tensor([tok.encode(text)[: args.tokens]])
    policy = make_policy(args.policy, args.states)

    def token_major():
        state = model.init_state(1, policy)
        return torch.stack([model.step(ids[:, t], state, policy)[0] for t in range(ids.shape[1])], 1), state

    runs = {
        "parallel forward (unbounded)": lambda: model(ids),
        f"exact prefill, layer-major (chunk {args.chunk})": lambda: model.prefill(
            ids, None, policy, "exact", all_logits=True, chunk=args.chunk),
        "fast prefill": lambda: model.prefill(ids, None, policy, "fast", all_logits=True),
    }
    if args.token_major:
        runs["exact, token-major (step per token)"] = token_major
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["parallel forward (unbounded)"])
    print(f"| {ids.shape[1]} tokens, {policy!r}, {torch.get_num_threads()} threads | s (median of {args.rounds}) "
          "| × parallel |\n|---|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {statistics.median(ts) / base:.2f} |")
    if args.token_major:
        (scan_logits, scan_state), (step_logits, step_state) = runs[list(runs)[1]](), token_major()
        same = all(sorted(a.pos[0, 0, : a.size].tolist()) == sorted(b.pos[0, 0, : b.size].tolist())
                   for a, b in zip(scan_state.layers, step_state.layers))
        print(f"\nmax |logit difference| scan vs steps: {(scan_logits - step_logits).abs().max():.2e}; "
              f"same states kept in every layer: {same}")


if __name__ == "__main__":
    main()
