"""How long `msrnn generate --compile` takes from the process's start to its first tokens, in a first process (an
empty compile cache) and in the ones after it (the cache `--compile` keeps: msrnn/compile_cache.py).

    python benchmarks/first_token.py --threads 2 [--processes 3] [--policy tova --states 16]

Each process is timed from its start (the interpreter's launch) to the first byte of text it prints (the prompt's
last logits, from the eager prefill), to the second (the first compiled step: the compile happens here) and to the
end of `--tokens` tokens. The cache goes to a fresh folder (MSRNN_CACHE) for the first process and is then reused;
a last process runs the same command without --compile (the baseline). Prints a markdown table."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def one_process(args, cache: str, compile: bool = True) -> dict:
    cmd = [sys.executable, "-m", "msrnn", "generate", args.prompt, "--max-new-tokens", str(args.tokens),
           "--threads", str(args.threads), "--policy", args.policy, "--states", str(args.states), "--temperature", "0"]
    cmd += ["--compile"] if compile else []
    env = dict(os.environ, MSRNN_CACHE=cache, PYTHONUNBUFFERED="1")
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    arrivals = []  # seconds since start of each chunk of text printed
    while True:
        chunk = os.read(proc.stdout.fileno(), 64)
        if not chunk:
            break
        arrivals.append(time.perf_counter() - t0)
    proc.wait()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return {"first": arrivals[0], "second": arrivals[1] if len(arrivals) > 1 else float("nan"),
            "end": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--states", type=int, default=16, help="small, so that the state fills within --tokens and the "
                    "whole-step graph compiles too")
    ap.add_argument("--prompt", default="The capital of France is")
    args = ap.parse_args()
    from tqdm import tqdm

    with tempfile.TemporaryDirectory() as cache:
        rows = [one_process(args, cache) for _ in tqdm(range(args.processes), desc="processes")]
        eager = one_process(args, cache, compile=False)  # the same command without --compile: the baseline
    print(f"| generate --compile, {args.threads} threads, {args.policy}-{args.states}, {args.tokens} tokens | "
          "first text (s) | second token (s) | all tokens (s) |\n|---|---:|---:|---:|")
    for i, r in enumerate(rows):
        name = "first process (empty cache)" if i == 0 else f"process {i + 1} (cache kept)"
        print(f"| {name} | {r['first']:.1f} | {r['second']:.1f} | {r['end']:.1f} |")
    print(f"| without --compile (eager) | {eager['first']:.1f} | {eager['second']:.1f} | {eager['end']:.1f} |")


if __name__ == "__main__":
    main()
