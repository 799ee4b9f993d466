"""First-token latency of a chat prompt: exact prefill (the recurrence, layer-major) against fast prefill.

    python benchmarks/chat_prefill.py --text ../shared/data/pride-and-prejudice.txt --tokens 575 --states 64

Builds a user message from the text whose chat-template prompt is --tokens long, and times
`model.prefill(prompt, policy=tova(k), mode=...)` for both modes in alternating rounds (medians)."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import msrnn
from msrnn.policies import make_policy


def chat_prompt(tok, text: str, tokens: int) -> list[int]:
    """The ids of the chat prompt of the longest prefix of `text` (in words) that stays within `tokens`."""
    words = text.split()

    def ids(n: int) -> list[int]:
        message = [{"role": "user", "content": " ".join(words[:n])}]
        return tok.encode(tok.apply_chat_template(message, add_generation_prompt=True), add_bos=False)

    lo, hi = 1, len(words)
    while lo < hi:  # binary search on the number of words
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(ids(mid)) <= tokens else (lo, mid - 1)
    return ids(lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", type=int, default=575)
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--states", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    model, tok = msrnn.load()
    ids = torch.tensor([chat_prompt(tok, open(args.text, encoding="utf-8").read()[5000:], args.tokens)])
    policy = make_policy(args.policy, args.states)
    times = {"exact": [], "fast": []}
    for _ in range(args.rounds):
        for mode in times:
            t0 = time.perf_counter()
            model.prefill(ids, None, policy, mode)
            times[mode].append(time.perf_counter() - t0)
    exact, fast = statistics.median(times["exact"]), statistics.median(times["fast"])
    print(f"{ids.shape[1]}-token chat prompt, {policy!r}, {torch.get_num_threads()} threads: exact {exact:.2f} s, "
          f"fast {fast:.2f} s, exact / fast = {exact / fast:.2f}")


if __name__ == "__main__":
    main()
