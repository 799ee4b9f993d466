"""Per-step cost of bounded policies, timed in turn (round-robin) on the bundled model.

    python benchmarks/policy_cost.py --policies tova,tova-decay,tova-value --threads 2 --rounds 11
    python benchmarks/policy_cost.py --policies tova,tova-decay,tova-value --threads 1 --rounds 11 --clock cpu

Each policy's state is brought to --position with chunked fast prefills; then --steps decode steps are timed per
round, the policies alternating so that a machine whose speed drifts slows all of them alike. Prints a markdown
table: ms/token (median over rounds), its ratio to the first policy, and the ratio paired within each round (median
and range over rounds: the load changes less within one round than between rounds), with the machine's load
average before and after. On a shared machine use --threads 1 --clock cpu: the process's own CPU time leaves out the
time other tenants held the core (with more threads it would count OpenMP's spinning too)."""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import msrnn
from msrnn.bench import in_turn, msrnn_decoder
from msrnn.policies import make_policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default="tova,tova-decay")
    ap.add_argument("--states", type=int, default=256)
    ap.add_argument("--position", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: this process's CPU time (for a shared machine, with --threads 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = msrnn.load()
    names = [n.strip() for n in args.policies.split(",")]
    runs = {n: msrnn_decoder(model, make_policy(n, args.states), args.position, args.steps) for n in names}
    load = os.getloadavg()[0]
    t = in_turn(runs, args.rounds, time.perf_counter if args.clock == "wall" else time.process_time)
    first = t[names[0]]
    print(f"{torch.get_num_threads()} threads, {args.clock} clock, {args.rounds} rounds of {args.steps} steps; "
          f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} CPUs)\n")
    print(f"| policy (k={args.states}, from position {args.position}) | ms/token | × {names[0]} | "
          f"× {names[0]}, paired per round (median, range) |\n|---|---:|---:|---:|")
    for n in names:
        paired = sorted(a / b for a, b in zip(t[n], first))
        print(f"| {n} | {statistics.median(t[n]) / args.steps * 1000:.1f} | "
              f"{statistics.median(t[n]) / statistics.median(first):.3f} | "
              f"{statistics.median(paired):.3f} ({paired[0]:.3f}–{paired[-1]:.3f}) |")


if __name__ == "__main__":
    main()
