"""`msrnn calibrate`: which kv heads fetch a fact from far back, measured on prompts it writes itself.

DuoAttention's criterion (Xiao et al. 2024): a head is a *retrieval* head if the model's answer suffers when that
head sees only the first tokens (sinks) and the most recent ones. Measured by ablation, jointly:

    prompts   a random pass key ("The pass key is 48213. Remember it.") at a random depth of generated filler
              (sentences of random words: never the novels, never the needle haystacks the evaluations use), asked
              for through the chat template, with the answer's tokens teacher-forced
    loss(C)   the answer digits' NLL (nats, mean over prompts) when the heads in C see only `sinks` + recent states
              at the question: the full model reads each context once, then the question and answer are read by the
              recurrence with those heads cut (keep_top, then the window), every other head keeping everything
    rounds    backward elimination: start with no head cut; each round measures, for every head still whole, what
              cutting it costs on top of the heads already cut (loss(C + h) - loss(C)), and cuts the cheaper half
              (one head at a time once 4 are left). Heads cut last are needed most: that order is the ranking.

One-at-a-time ablation (the first round) sees a head whose work another head can also do as unneeded; the rounds
see what the heads do together (the reason DuoAttention optimises its gates jointly). Writes into --out:
calibration.json (ranking, each head's cost in the round that cut it, settings, seconds), budgets.json (budgets per
layer and kv head for a mean of --states, as `retrieval` would give them: `--states budgets.json` for any policy),
heads.png (layers x kv heads) and a summary. The bundled model's calibration ships in msrnn/calibrations/.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from .errors import InputError
from .policies import make_policy
from .policies.retrieval import head_budgets
from .report import progress, pyplot
from .tasks import chat_parts

ADJECTIVES = "red quiet old bright small heavy green cold soft tall warm dark narrow loud gentle empty".split()
NOUNS = ("farmer river lamp garden teacher bridge horse window market sailor forest letter engine village kettle "
         "baker tower meadow wagon painter").split()
VERBS = "watched carried found painted followed crossed opened visited cleaned built".split()
PLACES = ("near the hill|by the old mill|before the storm|after dinner|in the morning|at the station|along the road|"
          "under the trees").split("|")


def filler(tokenizer, rng: random.Random, n: int) -> list[int]:
    """n tokens of generated sentences ("The quiet farmer crossed the old bridge near the hill.")."""
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(f" The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the "
                                f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(PLACES)}.", add_bos=False)
    return ids[:n]


def prompts(tokenizer, count: int, length: int, seed: int = 0):
    """(contexts (P, C), questions + answers (P, Q), the answer digits' slice of the second): pass keys at depths
    5-85 % of generated filler; context and question together are `length` tokens (as a needle prompt is)."""
    before, after = chat_parts(tokenizer)
    contexts, asked, spans = [], [], set()
    for p in range(count):
        rng = random.Random(f"calibrate/{seed}/{p}")
        key = str(rng.randrange(10_000, 100_000))
        needle = tokenizer.encode(f" The pass key is {key}. Remember it.", add_bos=False)
        question = tokenizer.encode("\n\nWhat is the pass key?", add_bos=False) + after
        lead, digits = (tokenizer.encode(s, add_bos=False) for s in ("The pass key is", f"The pass key is {key}."))
        n = length - len(before) - len(needle) - len(question)
        if n < 16:
            raise InputError(f"--length {length}: too short for the template, a pass key and the question.")
        text, at = filler(tokenizer, rng, n), int(rng.uniform(0.05, 0.85) * n)
        contexts.append(before + text[:at] + needle + text[at:])
        asked.append(question + digits)
        spans.add((len(question) + len(lead), len(question) + len(digits) - 1))  # the digits, not the final "."
    if len({len(a) for a in asked}) != 1 or len(spans) != 1:
        raise InputError("the calibration prompts did not tokenize to one shape; use another --seed.")
    (a, b), = spans
    return torch.tensor(contexts), torch.tensor(asked), slice(a, b)


class Ablation:
    """loss(cut): the answer digits' NLL with the heads in `cut` seeing only sinks + recent states at the question."""

    def __init__(self, model, contexts, asked, digits: slice, stream: int, sinks: int):
        self.model, self.asked, self.digits, self.stream, self.sinks = model, asked, digits, stream, sinks
        _, self.state = model.prefill(contexts)  # the full model reads every context once
        self.whole = contexts.shape[1] + asked.shape[1] + 2  # a budget that never evicts
        self.layers, self.heads = model.cfg.num_hidden_layers, model.cfg.num_key_value_heads

    def loss(self, cut) -> float:
        budgets = [[self.whole] * self.heads for _ in range(self.layers)]
        for i, h in cut:
            budgets[i][h] = self.stream
        policy = make_policy(f"sinks(sinks={self.sinks})", budgets) if cut else None
        logits, _ = self.model.prefill(self.asked, self.state.fork(), policy, all_logits=True)
        d = self.digits
        logp = torch.log_softmax(logits[:, d.start - 1 : d.stop - 1].float(), dim=-1)  # (P, digits, V)
        return float(-logp.gather(-1, self.asked[:, d, None]).sum(dim=(1, 2)).mean())


def eliminate(ablation: Ablation, bar=None) -> tuple[list[tuple[int, int]], dict, list[dict]]:
    """Backward elimination (see the module): (ranking, most needed first; each head's cost when it was cut;
    one record per round)."""
    whole = [(i, h) for i in range(ablation.layers) for h in range(ablation.heads)]
    cut: list[tuple[int, int]] = []
    cost, rounds = {}, []
    while whole:
        base = ablation.loss(cut)
        costs = {x: ablation.loss(cut + [x]) - base for x in whole} if len(whole) > 1 else {whole[0]: 0.0}
        if bar is not None:
            bar.update(len(whole))
        cheapest = sorted(whole, key=lambda x: costs[x])
        out = cheapest[: len(whole) // 2] if len(whole) > 4 else cheapest[:1]
        rounds.append({"whole": len(whole), "loss": base, "cut": [list(x) for x in out]})
        for x in out:
            cost[x] = costs[x]
        cut += out
        whole = [x for x in whole if x not in out]
    return cut[::-1], cost, rounds


def evaluations(heads: int) -> int:
    """Loss evaluations eliminate() makes for `heads` kv heads (the progress bar's total)."""
    total = 0
    while heads > 1:
        total += heads + 1
        heads -= heads // 2 if heads > 4 else 1
    return total + 1


def run_calibrate(args, load) -> None:
    for name, value, low in (("--prompts", args.prompts, 1), ("--length", args.length, 64),
                             ("--stream", args.stream, 2), ("--states", args.states, 2)):
        if value < low:
            raise InputError(f"{name} {value}: give at least {low}.")
    if not 0 <= args.sinks < args.stream:
        raise InputError(f"--sinks {args.sinks}: give 0 <= sinks < --stream ({args.stream}).")
    start = time.time()
    model, tokenizer = load()
    if args.length > model.cfg.max_position_embeddings:
        raise InputError(f"--length {args.length} is past the model's trained context "
                         f"({model.cfg.max_position_embeddings}); give a shorter one.")
    contexts, asked, digits = prompts(tokenizer, args.prompts, args.length, args.seed)
    contexts, asked = contexts.to(model.embed.weight.device), asked.to(model.embed.weight.device)
    ablation = Ablation(model, contexts, asked, digits, args.stream, args.sinks)
    with progress(evaluations(ablation.layers * ablation.heads), "calibrate", unit="cut") as bar:
        ranking, cost, rounds = eliminate(ablation, bar)
    seconds = time.time() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cal = {"model": args.model or "bundled SmolLM2-135M-Instruct", "identity": model.identity,
           "layers": ablation.layers, "kv_heads": ablation.heads, "ranking": [list(x) for x in ranking],
           "cost": [[cost[i, h] for h in range(ablation.heads)] for i in range(ablation.layers)],
           "full_loss": rounds[0]["loss"], "rounds": rounds, "seconds": round(seconds, 1),
           "criterion": "answer-digit NLL with the head cut to sinks + recent states at the question; backward "
                        "elimination, half the remaining heads a round",
           "settings": {k: getattr(args, k) for k in ("prompts", "length", "stream", "sinks", "seed", "dtype")}}
    (out / "calibration.json").write_text(json.dumps(cal, indent=1))
    budgets, chosen = head_budgets(ranking, ablation.layers, ablation.heads, args.states, 8.0, 0.25, 4)
    (out / "budgets.json").write_text(json.dumps({"states": args.states, "budgets": budgets}))
    plot_heads(cal, out / "heads.png")
    top = ", ".join(f"{i}.{h}" for i, h in ranking[:12])
    summary = (f"{ablation.layers * ablation.heads} kv heads ranked in {seconds:.0f} s ({len(rounds)} rounds, "
               f"{args.prompts} prompts of {args.length} tokens; answer NLL {rounds[0]['loss']:.2f} nats with no "
               f"head cut).\nmost needed (layer.head): {top}\nbudgets for a mean of {args.states} states: "
               f"{len(chosen)} heads x {budgets[chosen[0][0]][chosen[0][1]]}, the others {min(map(min, budgets))}\n"
               f"wrote {out}/calibration.json, budgets.json, heads.png")
    (out / "summary.txt").write_text(summary + "\n")
    print(summary)


def plot_heads(cal: dict, path: Path) -> None:
    """Layers x kv heads: each head's place in the ranking (dark: needed most), the top 12 numbered."""
    plt = pyplot()
    L, H = cal["layers"], cal["kv_heads"]
    place = torch.zeros(L, H)
    for r, (i, h) in enumerate(cal["ranking"]):
        place[i, h] = r
    fig, ax = plt.subplots(figsize=(2.2 + 0.5 * H, 1.5 + 0.22 * L))
    im = ax.imshow(place.numpy(), cmap="viridis", aspect="auto", origin="lower")
    for r, (i, h) in enumerate(cal["ranking"][:12]):
        ax.text(h, i, str(r + 1), ha="center", va="center", color="white", fontsize=7)
    ax.set_xlabel("kv head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_title("retrieval heads (1 = needed most)", fontsize=9)
    fig.colorbar(im, ax=ax, label="place in the ranking")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
