"""Probes behind docs/results/needle/memory-2048/README.md: why bounded states lose a far fact, on synthetic
pass-key prompts (generated sentences of random words, never the novels), 2,048 tokens, bundled model, --dtype auto.

    python docs/results/needle/memory-2048/probe.py read "tova@256;retrieval@256"       # the policy reads everything
    python docs/results/needle/memory-2048/probe.py question "sinks@budgets.json"       # full read, cut at the question
    python docs/results/needle/memory-2048/probe.py pin "tova@256;sinks@64;window@64"   # the needle pinned in every head

read: the usual bounded recurrence (exact prefill), then the question. question: the full model reads the context,
the policy cuts the state at the question (what a head needs when asked). pin: the policy reads everything, but the
needle's tokens are kept in every head (an oracle of selection: what is left when the right tokens are kept). Each
spec is NAME@BUDGET (a number or a budgets .json). Prints found / asked, each answer's start and the depths.
"""
from __future__ import annotations

import random
import sys
import time

import torch

import msrnn
from msrnn.generate import eos_ids
from msrnn.policies import INF, Policy, make_policy, parse_states
from msrnn.qa import answer, greedy
from msrnn.tasks import Query, Trial, chat_parts, is_correct

ADJ = "red quiet old bright small heavy green cold soft tall warm dark".split()
NOUN = "farmer river lamp garden teacher bridge horse window market sailor forest letter engine village kettle".split()
VERB = "watched carried found painted followed crossed opened visited cleaned built".split()
PLACE = "near the hill|by the old mill|before the storm|after dinner|in the morning|at the station|along the road"


def trials(tok, length: int, count: int) -> list[Trial]:
    """Pass keys ("The secret code is 48213.") at depths of 0-60 %, in sentences of random words."""
    before, after = chat_parts(tok)
    out = []
    for seed in range(count):
        rng = random.Random(f"dev/{seed}")
        key = str(rng.randrange(10000, 100000))
        needle = tok.encode(f" The secret code is {key}.", add_bos=False)
        q = tok.encode("\n\nWhat is the secret code?", add_bos=False) + after
        n = length - len(before) - len(needle) - len(q)
        fill: list[int] = []
        while len(fill) < n:
            fill += tok.encode(f" The {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} the {rng.choice(ADJ)} "
                               f"{rng.choice(NOUN)} {rng.choice(PLACE.split('|'))}.", add_bos=False)
        fill = fill[:n]
        at = int((seed % 3) / 4 * n + rng.uniform(0, 0.1) * n)
        span = (len(before) + at, len(before) + at + len(needle))
        out.append(Trial(f"d{seed}", before + fill[:at] + needle + fill[at:], [Query(q, key)], {"at": at / n}, span))
    return out


class Pinned(Policy):
    """`base`, with each row's needle tokens (positions in [lo, hi)) kept in every head: an oracle of selection."""

    name = "pinned"
    drops = False

    def __init__(self, base: Policy, lo: torch.Tensor, hi: torch.Tensor):
        super().__init__(base.states, base.positions)
        self.base, self.lo, self.hi = base, lo[:, None, None], hi[:, None, None]
        self.needs_attention, self.needs_keys = base.needs_attention, base.needs_keys

    def priority(self, attn, pos, score, **extra):
        prio = self.base.priority(attn, pos, score, **extra).expand(pos.shape)
        return prio.masked_fill((pos >= self.lo) & (pos < self.hi), INF)


def main() -> None:
    mode, specs = sys.argv[1], sys.argv[2].split(";")
    length, count = int(sys.argv[3]) if len(sys.argv) > 3 else 2048, int(sys.argv[4]) if len(sys.argv) > 4 else 6
    torch.set_num_threads(1)
    model, tok = msrnn.load(dtype="auto")
    batch = trials(tok, length, count)
    context = torch.tensor([t.context for t in batch])
    question = torch.tensor([t.queries[0].ids for t in batch])
    full = model.prefill(context)[1] if mode == "question" else None
    for spec in specs:
        name, budget = spec.rsplit("@", 1)
        policy, start = (None if name == "full" else make_policy(name, parse_states(budget))), time.time()
        if mode == "read":
            got = [a[0] for a in answer(model, batch, [policy], max_new_tokens=12, stop_ids=eos_ids(model, tok))[0]]
        else:
            if mode == "pin":
                policy = Pinned(policy, torch.tensor([t.span[0] for t in batch]), torch.tensor([t.span[1] for t in batch]))
                _, state = model.prefill(context, None, policy)
            else:
                state = full.fork()
            logits, state = model.prefill(question, state, policy)
            got = greedy(model, logits, state, policy, 12, eos_ids(model, tok))
        ok = [is_correct(tok.decode(g), t.queries[0].answer) for g, t in zip(got, batch)]
        print(f"{mode} {spec}: {sum(ok)}/{len(ok)} {ok} depths {[round(t.coords['at'], 2) for t in batch]} "
              f"({time.time() - start:.0f} s) {[tok.decode(g)[:24] for g in got[:3]]}", flush=True)


if __name__ == "__main__":
    main()
