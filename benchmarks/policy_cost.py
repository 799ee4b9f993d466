"""Per-step cost of bounded policies, timed in turn (round-robin) on the bundled model.

    python benchmarks/policy_cost.py --policies tova,tova-decay,tova-max --states 256 --position 2000

Each policy's state is brought to --position with chunked fast prefills; then --steps decode steps are timed per
round, the policies alternating so that a machine whose speed drifts slows all of them alike. Prints a markdown
table (ms/token, median over rounds, and the ratio to the first policy)."""
from __future__ import annotations

import argparse

import torch

import msrnn
from msrnn.bench import msrnn_decoder, side_by_side
from msrnn.policies import make_policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default="tova,tova-decay")
    ap.add_argument("--states", type=int, default=256)
    ap.add_argument("--position", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = msrnn.load()
    names = [n.strip() for n in args.policies.split(",")]
    runs = {n: msrnn_decoder(model, make_policy(n, args.states), args.position, args.steps) for n in names}
    t = side_by_side(runs, args.rounds)
    first = t[names[0]]
    print(f"| policy (k={args.states}, from position {args.position}) | ms/token | × {names[0]} |\n|---|---:|---:|")
    for n in names:
        print(f"| {n} | {t[n] / args.steps * 1000:.1f} | {t[n] / first:.3f} |")


if __name__ == "__main__":
    main()
