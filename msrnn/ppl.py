"""`msrnn eval ppl`: the paper's Table 3. The grid policies x budgets (msrnn/grid.py) runs on chunks of a text through
the engine of msrnn/eval.py, all cells of a batch of chunks in one batch state; every finished unit goes to
results.jsonl (msrnn/results.py: interrupt, then --resume); `torchrun --nproc_per_node N -m msrnn eval ppl ...` deals
the batches out to N processes. Written: table.md (PPL, its bootstrap interval over chunks, top-1 agreement, KL, and
with --compare each policy paired against one: msrnn/stats.py), table.csv, results.json and ppl.png."""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .errors import InputError
from .eval import Reference, check_run, group_steps, pick_chunks, prefix_length, score, smallest_budget
from .grid import budget_label, check_layers, find_cell, mean_budget, parse_grid
from .policies import make_policy
from .report import plain_log_axis, progress, pyplot, read_text, write_csv
from .results import RESULTS, load_results, record
from .stats import bootstrap_ppl, paired

DEFAULT_POLICIES = "full,baseline,window,sinks,h2o,tova-head,tova"
DEFAULT_BATCH = 2  # chunks per batch state: 2 x 24 cells = 48 rows, past which a step gains little per row


def _todo(names: list[str], budgets: list[int], b: int, done: dict) -> list[tuple[str, int | None]]:
    """The cells (policy, budget) of batch b that no finished unit holds yet; `full` has no budget."""
    cells = [(name, None) if name == "full" else (name, k) for name in names for k in budgets]
    return [cell for cell in dict.fromkeys(cells) if (*cell, b) not in done]


def run_grid(model, data: torch.Tensor, names: list[str], budgets: list[int], prefill: str, prompt: int, batch: int,
             done: dict, record: Callable[[dict], None], bar=None, mine: Callable[[int], bool] = lambda b: True,
             positions: str | None = None) -> dict:
    """Every (policy, budget) cell on every chunk of `data` (n, T), `batch` chunks at a time, all cells of a batch
    in one batch state; `done` units are skipped, and the new units of a batch are passed to `record` as soon as
    the batch is finished (use --batch 1 to record after every chunk). Only batches b with mine(b) are run (one
    process's share of a distributed run). Returns all units."""
    done = dict(done)
    for b, b0 in enumerate(range(0, len(data), batch)):
        cells = _todo(names, budgets, b, done)
        if not cells or not mine(b):
            continue
        tokens = data[b0 : b0 + batch]
        results = score(model, tokens, [make_policy(p, k, positions)
                                        for p, k in cells], prefill, prompt,
                        Reference.compute(model, tokens, progress=bar.update if bar is not None else None),
                        bar.update if bar is not None else None)
        for (name, k), s in zip(cells, results):
            unit = {"policy": name, "states": k, "batch": b, **s.sums()}
            done[(name, k, b)] = unit
            record(unit)
    return done


def grid_steps(data_shape, names, budgets, prefill, prompt, batch, done, mine=lambda b: True, layers=None) -> int:
    """Steps the remaining batches need (the progress bar's total): each batch's reference, T-1 tokens of the full
    model, then its recurrent steps; with the model's `layers`, a policy whose budgets differ per layer (PyramidKV)
    starts where its smallest layer budget ends."""
    n, T = data_shape

    def smallest(p, k):
        if layers is None:
            return min(k) if isinstance(k, tuple) else k
        return smallest_budget(make_policy(p, k), layers)

    starts = [[prefix_length(smallest(p, k), prefill, prompt) for p, k in _todo(names, budgets, b, done) if k is not None]
              for b in range(math.ceil(n / batch)) if mine(b)]
    return sum(T - 1 + group_steps(T, min(s)) for s in starts if s)


def summarize(units: dict, names: list[str], budgets: list[int], batches: int) -> list[dict]:
    """Cells from units: sums over the batches of chunks -> ppl, top-1 agreement, mean KL, and a bootstrap 95 %
    interval of the PPL over chunks (`ppl_low`, `ppl_high`; None from results files written before per-chunk sums)."""
    cells = []
    for name in names:
        for k in [None] if name == "full" else budgets:
            parts = [units[(name, k, b)] for b in range(batches)]
            tokens = sum(u["tokens"] for u in parts)
            loss = sum(u["loss"] for u in parts) / tokens
            low = high = None
            chunks = {}
            if all("chunk_loss" in u for u in parts):  # per chunk, in the same order for every cell (paired)
                chunks = {key: [x for u in parts for x in u[key]] for key in ("chunk_loss", "chunk_tokens")}
                low, high = bootstrap_ppl(chunks["chunk_loss"], chunks["chunk_tokens"])
            cells.append({"policy": name, "states": k, "tokens": tokens, "loss": loss, "ppl": math.exp(loss),
                          "ppl_low": low, "ppl_high": high, "top1_agreement": sum(u["agree"] for u in parts) / tokens,
                          "kl": sum(u["kl"] for u in parts) / tokens, **chunks})
    return cells


def markdown_tables(cells: list[dict], names: list[str], budgets: list[int], title: str,
                    pairs: list[dict] = ()) -> str:
    """The paper's Table 3 layout: rows = policies, columns = states per layer; `full` (unbounded) repeated in every
    column as the reference. Then the same grid for top-1 agreement and KL(full || policy), and the paired
    comparison with one policy (`paired`) if asked for."""
    head = "| policy | " + " | ".join(map(budget_label, budgets)) + " |\n|---|" + "---:|" * len(budgets)
    blocks = [f"# {title}"]
    for label, key, fmt in (("Perplexity", "ppl", "{:.2f}"), ("Top-1 agreement with full (%)", "top1_agreement", None),
                            ("Mean KL(full || policy) per token (nats)", "kl", "{:.4f}")):
        rows = [f"| {name} | " + " | ".join(
            (fmt.format(find_cell(cells, name, k)[key]) if fmt else f"{100 * find_cell(cells, name, k)[key]:.1f}")
            for k in budgets) + " |" for name in names]
        blocks.append(f"## {label}\n\n{head}\n" + "\n".join(rows))
    if all(c.get("ppl_low") is not None for c in cells):
        rows = [f"| {name} | " + " | ".join(
            "{ppl_low:.2f}–{ppl_high:.2f}".format(**find_cell(cells, name, k)) for k in budgets) + " |" for name in names]
        blocks.insert(2, "## Perplexity: bootstrap 95 % interval over chunks\n\n" + head + "\n" + "\n".join(rows))
    if pairs:
        against = pairs[0]["against"]
        cell = {(r["policy"], r["states"]): r for r in pairs}
        for label, key, fmt in ((f"PPL / PPL of {against}, paired over the same chunks (bootstrap 95 %)", "ratio",
                                 "{:.3f} [{:.3f}, {:.3f}]"),
                                (f"Share of {against}'s gap to full closed, paired (bootstrap 95 %)", "gap_closed",
                                 "{:.0%} [{:.0%}, {:.0%}]")):
            rows = [f"| {name} | " + " | ".join(
                fmt.format(*(cell[name, k][key + end] for end in ("", "_low", "_high"))) if (name, k) in cell else "–"
                for k in budgets) + " |" for name in names if name not in ("full", against)]
            blocks.append(f"## {label}\n\n{head}\n" + "\n".join(rows))
    return "\n\n".join(blocks) + "\n"


def plot_grid(cells: list[dict], names: list[str], budgets: list[int], path: Path, title: str) -> None:
    """PNG: PPL vs states per layer (log-2 x axis), one line per policy (shaded: its bootstrap 95 % interval over
    chunks), `full` as a horizontal reference."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        if name == "full":
            full = find_cell(cells, name, None)
            ax.axhline(full["ppl"], color="black", ls="--", label="full (unbounded)")
            if full.get("ppl_low") is not None:
                ax.axhspan(full["ppl_low"], full["ppl_high"], color="black", alpha=0.06, lw=0)
            continue
        row = [find_cell(cells, name, k) for k in budgets]
        x = [mean_budget(k) for k in budgets]  # a budget per layer sits at its mean
        (line,) = ax.plot(x, [c["ppl"] for c in row], "o-", label=name)
        if all(c.get("ppl_low") is not None for c in row):  # the bootstrap interval over chunks, shaded
            ax.fill_between(x, [c["ppl_low"] for c in row], [c["ppl_high"] for c in row],
                            color=line.get_color(), alpha=0.15, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain_log_axis(ax.yaxis)
    ax.set_xticks([mean_budget(k) for k in budgets], [budget_label(k) for k in budgets])
    ax.set(xlabel="states per layer (k)", ylabel="perplexity (log scale)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_ppl(args, load) -> None:
    """`msrnn eval ppl`: the grid of args.policies x args.states; `load()` gives (model, tokenizer)."""
    if args.batch is not None and args.batch < 1:
        raise InputError(f"--batch {args.batch}: give a positive number of chunks per batch.")
    text_path = Path(args.text)
    text = read_text(text_path)
    if args.context < 2 or args.chunks < 0:
        raise InputError(f"--context {args.context} / --chunks {args.chunks}: give --context >= 2 (tokens per chunk) "
                         "and --chunks >= 0 (0 = every chunk).")
    prompt = check_run(args.prefill, args.prompt, args.context)
    compare = getattr(args, "compare", None)
    names, budgets = parse_grid(args.policies, args.states, args.positions, compare)  # last: it runs policy files
    if "full" not in names:  # measured anyway (the reference for agreement and KL): always in the table
        names = ["full", *names]
    model, tokenizer = load()
    check_layers(names, budgets, model.cfg.num_hidden_layers, args.positions)
    ids = tokenizer.encode(text)
    data, index = pick_chunks(ids, args.context, args.chunks)
    batch = min(args.batch or DEFAULT_BATCH, len(data))
    check_context(args.context, batch, model.cfg)
    settings = {"model": model.identity, "dtype": args.dtype, "text": text_path.name,
                "tokens_sha256": hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16], "context": args.context,
                "chunks": index, "prefill": args.prefill, "prompt": prompt, "batch": batch,
                **({"positions": args.positions} if args.positions not in (None, "absolute") else {})}
    out = Path(args.out or f"out/eval-{text_path.stem}")
    results = out / RESULTS
    rank, world = _distributed()
    if rank == 0:
        done = load_results(results, settings, args.resume)
    _barrier(world)
    if rank:  # the file rank 0 has just started or checked
        done = load_results(results, settings, resume=True)
    mine = lambda b: b % world == rank  # noqa: E731: batches are dealt out round-robin
    total = grid_steps(data.shape, names, budgets, args.prefill, prompt, batch, done, mine,
                       model.cfg.num_hidden_layers)
    if rank == 0:
        print(f"msrnn eval: {len(data)} chunks x {args.context} tokens of {text_path.name} (chunks {index} of "
              f"{len(ids) // args.context}; {len(ids)} tokens), {args.prefill} prefill, prompt {prompt}, batch {batch}; "
              f"{sum(1 for u in done if u[0] in names)} units already done"
              + (f"; {world} processes" if world > 1 else ""), file=sys.stderr)
    t0 = time.perf_counter()
    with progress(total, "eval ppl" if world == 1 else f"eval ppl [{rank}]", disable=rank > 0) as bar:
        try:
            units = run_grid(model, data, names, budgets, args.prefill, prompt, batch, done,
                             lambda unit: record(results, unit), bar, mine, args.positions)
        except KeyboardInterrupt:
            bar.close()
            print(f"msrnn: interrupted; finished cells are kept in {results}: rerun with --resume to continue.",
                  file=sys.stderr)
            raise
    _barrier(world)
    if rank:
        return
    if world > 1:  # every process appended its units to the one results file
        units = load_results(results, settings, resume=True)
    cells = summarize(units, names, budgets, math.ceil(len(data) / batch))
    pairs = paired(cells, names, budgets, compare) if compare else []
    title = (f"{text_path.name}: {len(data)} x {args.context} tokens, {args.prefill} prefill"
             + (f", scored after a {prompt}-token prompt" if prompt else ""))
    table = markdown_tables(cells, names, budgets, title, pairs)
    (out / "table.md").write_text(table)
    per_chunk = ("chunk_loss", "chunk_tokens")  # in results.jsonl already
    write_csv(out / "table.csv", [{k: v for k, v in c.items() if k not in per_chunk} for c in cells])
    (out / "results.json").write_text(json.dumps(
        {"settings": settings, "cells": [{k: v for k, v in c.items() if k not in per_chunk} for c in cells],
         "paired": pairs, "seconds_this_run": round(time.perf_counter() - t0, 1)}, indent=2))
    plot_grid(cells, names, budgets, out / "ppl.png", title)
    print(table)
    print(f"wrote {out}/table.md, table.csv, results.json, ppl.png ({results} holds the raw units)")


def physical_memory() -> int | None:
    """Bytes of RAM this machine has (None where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_context(context: int, batch: int, cfg) -> None:
    """Before a batch runs: a reference (B, T-1, V) fp32 larger than the machine's memory is refused; a context past
    the model's trained length is said on stderr (the full model is then outside what it was trained on)."""
    from .report import human_bytes

    need = batch * (context - 1) * cfg.vocab_size * 4
    ram = physical_memory()
    if ram is not None and need > ram:
        raise InputError(f"--context {context} with --batch {batch}: the full model's log-probabilities alone take "
                         f"{human_bytes(need)} ({batch} x {context - 1} x {cfg.vocab_size} fp32), more than this "
                         f"machine's {human_bytes(ram)}; give a smaller --batch or --context.")
    limit = cfg.max_position_embeddings
    if context > limit:
        print(f"msrnn eval: --context {context} is past the model's trained context of {limit} tokens: the full "
              f"model, every policy's reference, runs on positions it was never trained on, and its cost grows with "
              f"the square of the context ({human_bytes(need)} of reference log-probabilities per batch); "
              f"`msrnn eval stream` measures a bounded policy past the trained context.", file=sys.stderr)


def _distributed() -> tuple[int, int]:
    """(rank, world size): (0, 1) alone; under torchrun (WORLD_SIZE > 1) a gloo process group is started. Only
    barriers cross it (gloo does those whatever device the model runs on): the units travel through the one
    results file, to which every process appends each finished unit as one line in one write."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), world


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
