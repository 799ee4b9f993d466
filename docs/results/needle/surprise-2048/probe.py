"""The probe behind `surprise` (docs/results/needle/surprise-2048/README.md), on the development haystack: needles in
*Frankenstein* (the evaluation's needles are in *Pride and Prejudice*), 2,048 tokens, depths 0/25/50, 4 seeds,
bundled model, --dtype auto, the full model's surprisal of every token.

    python docs/results/needle/surprise-2048/probe.py            # ~2 min at one thread

ranks: where the needle's tokens rank among the prompt's 2,048 by surprisal -log p(x_t | x_<t) (0 = the most
surprising). keep: with a reserve of R states ranked by e_t = max(s_{t-E+1..t}) beside 4 sinks and 128 recent
states, the share of the needle's tokens that a static ranking would keep at the question.
"""
from __future__ import annotations

import torch

import msrnn
from msrnn.tasks import needle_trial


def main() -> None:
    torch.set_num_threads(1)
    model, tok = msrnn.load(dtype="auto")
    book = tok.encode(open("../shared/data/frankenstein.txt").read()[200000:400000], add_bos=False)
    rows = []
    for seed in range(4):
        trials = [needle_trial(tok, book, length=2048, depth=d, seed=seed) for d in (0, 25, 50)]
        ids = torch.tensor([t.context for t in trials])
        logits, _ = model.prefill(ids, all_logits=True)  # (3, T, V) the unbounded model
        s = -logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (3, T-1)
        s = torch.cat([torch.zeros(len(trials), 1), s], dim=1)  # (3, T) s_0 = 0
        rows += [(t, row) for t, row in zip(trials, s)]
    for t, s in rows[:4]:
        lo, hi = t.span
        rank = (s[None] > s[lo:hi, None]).sum(-1).tolist()  # how many tokens surprised the model more
        print(f"depth {t.coords['depth']:3} seed {t.coords['seed']}:",
              " ".join(f"{tok.decode([i])!r}:{v:.1f}/{r}" for i, v, r in zip(t.context[lo:hi], s[lo:hi].tolist(), rank)))
    for E in (1, 8, 16, 24):
        for R in (64, 124, 188):
            kept = []
            for t, s in rows:
                lo, hi = t.span
                e = torch.cat([torch.zeros(E - 1), s]).unfold(0, E, 1).amax(-1)  # (T,) e_t
                old = torch.arange(4, len(s) - 128)  # neither sink nor recent at the question
                top = set(old[e[old].topk(R).indices].tolist())
                kept.append(sum(p in top for p in range(lo, hi)) / (hi - lo))
            print(f"span {E:2} reserve {R:3}: whole needle kept {sum(k == 1 for k in kept)}/{len(kept)}, "
                  f"mean share {sum(kept) / len(kept):.2f}")


if __name__ == "__main__":
    main()
