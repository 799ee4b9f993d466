"""The cost of a policy in one layer's decode step (attention.ring_step), without the rest of the model.

    python benchmarks/ring_step_cost.py --policies tova,tova-decay,tova-value --calls 100 --rounds 61

One layer of the bundled model's shapes (3 kv heads, 3 query heads each, head dim 64) holding k states takes one
token per call, the policies alternating every `--calls` calls; prints the median CPU microseconds per call and what
each policy adds to the first. The model's matrix products are left out, so a policy's own operations stand out,
and many short alternating rounds on one thread make it usable on a loaded machine (policy_cost.py gives the whole
step. With --threads 2 an operation over more than 32,768 numbers runs as a parallel region, whose start and
join cost more than such a small operation itself.)"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from msrnn.attention import ring_step
from msrnn.bench import in_turn
from msrnn.policies import make_policy
from msrnn.state import State


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default="tova,tova-decay,tova-value")
    ap.add_argument("--states", type=int, default=256)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=61)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU time then counts OpenMP's spinning)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, Hkv, G, hd, k = 1, 3, 3, 64, args.states
    gen = torch.Generator().manual_seed(0)
    names = [n.strip() for n in args.policies.split(",")]
    runs = {}
    for name in names:
        policy, layer = make_policy(name, k), State.empty(1, B, Hkv, hd, k + 2, torch.float32).layers[0]
        layer.append(torch.randn(B, Hkv, k, hd, generator=gen), torch.randn(B, Hkv, k, hd, generator=gen),
                     torch.arange(k)[None])  # a full layer: every later call is a ring step
        q, key, value = (torch.randn(B, Hkv, *s, hd, generator=gen) for s in ((G, 1), (1,), (1,)))
        positions = iter(torch.arange(k, k + args.calls * (args.rounds + 1))[:, None, None])  # (1, 1) each

        def run(policy=policy, layer=layer, q=q, key=key, value=value, positions=positions):
            for _ in range(args.calls):
                ring_step(q, key, value, layer, next(positions), policy, None)
        runs[name] = run
    with torch.inference_mode():
        t = in_turn(runs, args.rounds, time.process_time)
    first = statistics.median(t[names[0]]) / args.calls * 1e6
    print(f"| policy (one layer, k={k}) | CPU µs per step | + over {names[0]} |\n|---|---:|---:|")
    for n in names:
        us = statistics.median(t[n]) / args.calls * 1e6
        print(f"| {n} | {us:.1f} | {us - first:+.1f} |")


if __name__ == "__main__":
    main()
