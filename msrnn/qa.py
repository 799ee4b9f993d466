"""`msrnn eval needle` and `msrnn eval recall`: every policy x budget answers the prompts of a task
(msrnn/tasks.py) greedily; exact-match accuracy per cell with a Wilson 95 % interval; resumable like `eval ppl`.

    answers = answer(model, trials, [None, make_policy("tova", 256)], max_new_tokens=16, stop_ids=eos)
    answers[i][b][j]        # the token ids policy i answered to query j of trial b (greedy, stop ids left out)

How a batch of trials of one shape (equal token counts) is answered, with the shortcuts of `eval ppl`
(msrnn/eval.py), each computing the same function as running every cell alone:
- Every bounded cell (policy, budget) is a block of rows in ONE batch state (RowPolicies): cells x trials rows,
  one prefill and one decoding step for all of them.
- No budget evicts anything during the first k_min tokens of the context: they are one parallel prefill per kind
  of running score (eval.prefix_state), shared by every cell. The rest of the context is read by the recurrence
  (`--prefill exact`, the paper's setting) or, with `--prefill fast`, in the same parallel pass, compressed ONCE
  by the last context token's attention (kvpress' and the official TOVA code's usage). Either way the question
  comes after the compression: the policy cannot know what will be asked.
- Each query is asked of a fork of the state after the context (prefilled by the recurrence), then answered
  greedily token by token, stopping at an end-of-sequence id.
- `full` (the unbounded transformer) runs alone: one parallel pass over the context.

Results: results.jsonl (one line per cell x trial, written as each batch finishes: interrupt, then --resume),
table.md, cells.csv, results.json and figures (one heatmap per policy for the needle, accuracy vs pairs for recall).
"""
from __future__ import annotations

import hashlib
import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .batch import RowPolicies
from .errors import InputError
from .eval import prefix_state
from .generate import decode_tokens, eos_ids
from .grid import parse_grid
from .policies import Policy, make_policy
from .report import progress, pyplot, read_text, write_csv
from .results import RESULTS, answer_unit_key, answer_unit_problem, load_results, record
from .stats import wilson
from .tasks import Trial, chat_parts, is_correct, needle_trial, recall_trial

DEFAULT_TASK_POLICIES = "full,tova,h2o,window,sinks"


# --- answering ----------------------------------------------------------------------------------------------------
def _groups(policies: Sequence[Policy | None]) -> list[list[int]]:
    """Indices of `policies` run together: full alone, the bounded ones one batch per position scheme (they cache
    keys differently)."""
    full = [[i] for i, p in enumerate(policies) if p is None]
    schemes: dict[str, list[int]] = {}
    for i, p in enumerate(policies):
        if p is not None:
            schemes.setdefault(p.positions, []).append(i)
    return full + list(schemes.values())


def _prefix(members: Sequence[Policy], context: int, prefill: str, layers: int | None = None) -> int:
    """Context tokens every member reads as the full model does (no eviction yet): one shared parallel prefill.
    With the model's `layers`, a member with budgets per layer (PyramidKV) counts its smallest."""
    if prefill == "fast":  # the one eviction happens at the last context token
        return context - 1
    least = [min(m.at_layer(i, layers).min_budget() for i in range(layers)) if layers else m.min_budget()
             for m in members]  # the smallest budget of any layer and kv head: no eviction before it
    return min(min(least), context)


def steps(trials: Sequence[Trial], policies: Sequence[Policy | None], prefill: str) -> int:
    """Prompt tokens a batch reads by the model beyond the shared prefixes (the progress bar's unit; the answers'
    tokens are not counted): full reads the whole context in one pass, a bounded group what follows its prefix."""
    context, queries = len(trials[0].context), sum(trials[0].shape[1:])
    groups = [[policies[i] for i in idx] for idx in _groups(policies)]
    return sum(context - (0 if g[0] is None else _prefix(g, context, prefill)) + queries for g in groups)


@torch.inference_mode()
def answer(model, trials: Sequence[Trial], policies: Sequence[Policy | None], prefill: str = "exact",
           max_new_tokens: int = 16, stop_ids: Sequence[int] = (),
           progress: Callable[[int], None] | None = None) -> list[list[list[list[int]]]]:
    """Greedy answers of every policy (None = full) to every query of `trials` (all of one shape): a list per policy
    of a list per trial of a list per query of token ids."""
    if not trials or len({t.shape for t in trials}) != 1:
        raise InputError("answer() takes a non-empty batch of trials of one shape (equal token counts).")
    if prefill not in ("exact", "fast"):
        raise InputError(f"prefill={prefill!r} is unknown; choose 'exact' or 'fast'.")
    device = model.embed.weight.device
    B = len(trials)
    context = torch.tensor([t.context for t in trials], device=device)  # (B, Lc)
    out: list = [[[None] * len(t.queries) for t in trials] for _ in policies]
    for idx in _groups(policies):
        members = [policies[i] for i in idx]
        P = len(members)
        if members[0] is None:
            policy, state = None, model.init_state(B)
            model.prefill(context, state, None, progress=progress)
        else:
            policy = RowPolicies(members, B)  # rows member-major: member i owns rows i*B .. (i+1)*B - 1
            n = _prefix(members, context.shape[1], prefill, model.cfg.num_hidden_layers)
            state = prefix_state(model, context[:, :n], policy)
            if n < context.shape[1]:
                model.prefill(context[:, n:].repeat(P, 1), state, policy, mode=prefill, progress=progress)
        for j in range(len(trials[0].queries)):
            asked = state if j == len(trials[0].queries) - 1 else state.fork()  # every query sees the same state
            query = torch.tensor([t.queries[j].ids for t in trials], device=device).repeat(P, 1)  # (P*B, Lq)
            logits, asked = model.prefill(query, asked, policy, mode="exact", progress=progress)
            for row, ids in enumerate(greedy(model, logits, asked, policy, max_new_tokens, stop_ids)):
                out[idx[row // B]][row % B][j] = ids
    return out


def greedy(model, logits, state, policy, max_new_tokens: int, stop_ids: Sequence[int]) -> list[list[int]]:
    """The most likely continuation of every row, up to `max_new_tokens` tokens or a stop id (left out)."""
    got: list[list[int]] = [[] for _ in range(logits.shape[0])]
    for tokens, new in decode_tokens(model, logits, state, policy, max_new_tokens, lambda lg: lg.argmax(-1), stop_ids):
        for row in new.nonzero()[:, 0].tolist():
            got[row].append(int(tokens[row]))
    return got


# --- the grid, resumable ------------------------------------------------------------------------------------------
def batches(trials: Sequence[Trial], size: int) -> list[list[Trial]]:
    """Trials in runs of at most `size`, each run of one shape (first-seen order of the shapes)."""
    by_shape: dict[tuple, list[Trial]] = {}
    for t in trials:
        by_shape.setdefault(t.shape, []).append(t)
    return [group[a : a + size] for group in by_shape.values() for a in range(0, len(group), size)]


def _todo(cells, group: Sequence[Trial], done: dict) -> list[tuple[str, int | None]]:
    return [c for c in cells if any((*c, t.key) not in done for t in group)]


def run_grid(model, decode, trials: Sequence[Trial], cells, prefill: str, batch: int, done: dict,
             record: Callable[[dict], None], positions: str | None = None, max_new_tokens: int = 16,
             stop_ids: Sequence[int] = (), bar=None) -> dict:
    """Every cell (policy name, budget or None) on every trial, `batch` trials of one shape at a time; the cells a
    batch still misses run together and their units go to `record` when the batch is done. Returns all units
    {(policy, states, trial key): unit}."""
    done = dict(done)
    for group in batches(trials, batch):
        todo = _todo(cells, group, done)
        if not todo:
            continue
        policies = [make_policy(name, k, positions) for name, k in todo]
        answers = answer(model, group, policies, prefill, max_new_tokens, stop_ids,
                         bar.update if bar is not None else None)
        for (name, k), per_trial in zip(todo, answers):
            for trial, ids in zip(group, per_trial):
                texts = [decode(a) for a in ids]
                expected = [q.answer for q in trial.queries]
                unit = {"policy": name, "states": k, "trial": trial.key, **trial.coords, "answers": texts,
                        "expected": expected, "correct": [is_correct(a, e) for a, e in zip(texts, expected)]}
                done[answer_unit_key(unit)] = unit
                record(unit)
    return done


def grid_steps(trials, cells, prefill, batch, done, positions=None) -> int:
    """Prompt tokens the remaining batches read (the progress bar's total)."""
    return sum(steps(group, [make_policy(n, k, positions) for n, k in todo], prefill)
               for group in batches(trials, batch) if (todo := _todo(cells, group, done)))


def summarize(units: dict, cells, trials: Sequence[Trial], axes: Sequence[str]) -> list[dict]:
    """Accuracy per cell and per value of `axes` (coordinates of the trials, e.g. ("length", "depth")), over the
    queries of every trial there: answers, correct, accuracy and its Wilson 95 % interval (low, high)."""
    rows = []
    for name, k in cells:
        buckets: dict[tuple, list[bool]] = {}
        for t in trials:
            unit = units[(name, k, t.key)]
            buckets.setdefault(tuple(t.coords[a] for a in axes), []).extend(unit["correct"])
        for where, marks in buckets.items():
            low, high = wilson(sum(marks), len(marks))
            rows.append({"policy": name, "states": k, **dict(zip(axes, where)), "answers": len(marks),
                         "correct": sum(marks), "accuracy": sum(marks) / len(marks), "low": low, "high": high})
    return rows


def _label(name: str, k: int | None) -> str:
    return name if k is None else f"{name} k={k}"


def accuracy_table(rows: list[dict], cells, axis: str, title: str) -> str:
    """Markdown: one row per cell, one column per value of `axis`: accuracy % and its Wilson 95 % interval."""
    values = list(dict.fromkeys(r[axis] for r in rows))
    at = {(r["policy"], r["states"], r[axis]): r for r in rows}
    lines = [f"## {title}", "", "| policy | " + " | ".join(f"{axis} {v:g}" for v in values) + " |",
             "|---|" + "---:|" * len(values)]
    for name, k in cells:
        lines.append(f"| {_label(name, k)} | " + " | ".join(
            "{:.0f} [{:.0f}–{:.0f}] ({}/{})".format(100 * (r := at[(name, k, v)])["accuracy"], 100 * r["low"],
                                                   100 * r["high"], r["correct"], r["answers"]) for v in values) + " |")
    return "\n".join(lines) + "\n"


def _cells(names: list[str], budgets: list[int]) -> list[tuple[str, int | None]]:
    return list(dict.fromkeys((n, None) if n == "full" else (n, k) for n in names for k in budgets))


def _run(args, model, tokenizer, trials, names, budgets, settings, out: Path, what: str) -> tuple[list, dict]:
    """The shared part of both commands: the grid with a progress bar, resumable. Returns (cells, units)."""
    cells = _cells(names, budgets)
    done = load_results(out / RESULTS, settings, args.resume, key=answer_unit_key, problem=answer_unit_problem)
    print(f"msrnn eval {what}: {len(trials)} trials x {len(cells)} cells (policy x budget, full once), "
          f"{args.prefill} prefill, batch {args.batch}; "
          f"{sum(1 for u in done if u[:2] in cells and u[2] in {t.key for t in trials})} answers already done",
          file=sys.stderr)
    stop = eos_ids(model, tokenizer)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    t0 = time.perf_counter()
    total = grid_steps(trials, cells, args.prefill, args.batch, done, args.positions)
    with progress(total, f"eval {what}", unit="tok") as bar:
        try:
            units = run_grid(model, decode, trials, cells, args.prefill, args.batch, done,
                             lambda unit: record(out / RESULTS, unit), args.positions, args.max_new_tokens, stop, bar)
        except KeyboardInterrupt:
            bar.close()
            print(f"msrnn: interrupted; finished answers are kept in {out / RESULTS}: rerun with --resume to "
                  "continue.", file=sys.stderr)
            raise
    settings["seconds_this_run"] = round(time.perf_counter() - t0, 1)
    return cells, units


def _grid(args) -> tuple[list[str], list[int]]:
    """Policy names (full first) and budgets, after the options both commands share are checked (before loading)."""
    if args.batch < 1:
        raise InputError(f"--batch {args.batch}: give a positive number of trials per batch.")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {args.max_new_tokens}: give at least 1.")
    if args.seeds < 1:
        raise InputError(f"--seeds {args.seeds}: give at least 1 trial per cell.")
    names, budgets = parse_grid(args.policies, args.states, args.positions)
    if "full" not in names:  # the ceiling: always measured, always first
        names = ["full", *names]
    return ["full", *[n for n in names if n != "full"]], budgets


def _ints(text: str, option: str, low: int = 0) -> list[int]:
    try:
        values = list(dict.fromkeys(int(v) for v in text.split(",") if v.strip()))
    except ValueError:
        raise InputError(f"{option} {text!r}: give comma-separated integers.") from None
    if not values or min(values) < low:
        raise InputError(f"{option} {text!r}: give integers >= {low}.")
    return values


def _write(out: Path, settings: dict, rows: list[dict], table: str) -> None:
    (out / "table.md").write_text(table)
    write_csv(out / "cells.csv", rows)
    (out / "results.json").write_text(json.dumps({"settings": settings, "cells": rows}, indent=2))
    print(table)


# --- msrnn eval needle --------------------------------------------------------------------------------------------
def needle_trials(tokenizer, haystack, lengths, depths, seeds, needle, question, digits) -> list[Trial]:
    parts = chat_parts(tokenizer)
    return [needle_trial(tokenizer, haystack, L, d, s, needle, question, digits, parts)
            for L in lengths for d in depths for s in seeds]


def run_needle(args, load) -> None:
    """`msrnn eval needle`; `load()` gives (model, tokenizer)."""
    text_path = Path(args.text)
    text = read_text(text_path)
    lengths, depths = _ints(args.lengths, "--lengths", 1), _ints(args.depths, "--depths")
    if max(depths) > 100:
        raise InputError(f"--depths {args.depths}: give percentages in 0..100.")
    names, budgets = _grid(args)
    model, tokenizer = load()
    if max(lengths) > model.cfg.max_position_embeddings:
        print(f"msrnn: note: lengths past the model's trained context ({model.cfg.max_position_embeddings}) test "
              "the full model out of its training range.", file=sys.stderr)
    haystack = tokenizer.encode(text, add_bos=False)
    trials = needle_trials(tokenizer, haystack, lengths, depths, range(args.seeds), args.needle, args.question,
                           args.digits)
    settings = {"task": "needle", "model": model.identity, "dtype": args.dtype, "text": text_path.name,
                "text_sha256": hashlib.sha256(text.encode()).hexdigest()[:16], "needle": args.needle,
                "question": args.question, "digits": args.digits, "prefill": args.prefill,
                "max_new_tokens": args.max_new_tokens, "positions": args.positions or "absolute"}
    out = Path(args.out)
    cells, units = _run(args, model, tokenizer, trials, names, budgets, settings, out, "needle")
    detail = summarize(units, cells, trials, ("length", "depth"))
    title = (f"Needle in a haystack: {text_path.name}, lengths {args.lengths}, depths {args.depths} %, "
             f"{args.seeds} seeds, {args.prefill} prefill")
    table = (f"# {title}\n\nAccuracy % [Wilson 95 % interval] (correct/answers). Needle: {args.needle!r}; "
             f"question: {args.question!r}.\n\n"
             + accuracy_table(summarize(units, cells, trials, ("length",)), cells, "length", "By length (all depths)")
             + "\n" + accuracy_table(summarize(units, cells, trials, ("depth",)), cells, "depth",
                                     "By depth (all lengths)"))
    _write(out, settings, detail, table)
    for name in names:
        plot_needle(detail, name, [k for n, k in cells if n == name], lengths, depths, out / f"needle-{name}.png",
                    title)
    if args.trace_failures:
        trace_failures(model, tokenizer, trials, units, cells, args, out)
    print(f"wrote {out}/table.md, cells.csv, results.json, needle-*.png ({out / RESULTS} holds every answer)")


def plot_needle(rows: list[dict], name: str, budgets: list[int | None], lengths, depths, path: Path,
                title: str) -> None:
    """The needle picture: depth (rows) x length (columns), colour = accuracy, one panel per budget."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(budgets), figsize=(1.2 + 0.9 * len(lengths) * len(budgets) + 1.2, 4.2),
                             squeeze=False)
    at = {(r["states"], r["length"], r["depth"]): r for r in rows if r["policy"] == name}
    image = None
    for ax, k in zip(axes[0], budgets):
        grid = [[at[(k, L, d)]["accuracy"] for L in lengths] for d in depths]  # (depths, lengths)
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i, d in enumerate(depths):
            for j, L in enumerate(lengths):
                r = at[(k, L, d)]
                ax.text(j, i, f"{r['correct']}/{r['answers']}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g} %" for d in depths])
        ax.set(xlabel="prompt length (tokens)", title=_label(name, k))
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), label="exact-match accuracy", fraction=0.05)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# --- msrnn eval recall --------------------------------------------------------------------------------------------
def run_recall(args, load) -> None:
    """`msrnn eval recall`; `load()` gives (model, tokenizer)."""
    pairs = _ints(args.pairs, "--pairs", 1)
    names, budgets = _grid(args)
    model, tokenizer = load()
    parts = chat_parts(tokenizer)
    trials = [recall_trial(tokenizer, n, s, args.queries, args.question, parts=parts)
              for n in pairs for s in range(args.seeds)]
    settings = {"task": "recall", "model": model.identity, "dtype": args.dtype, "question": args.question,
                "queries": args.queries, "prefill": args.prefill, "max_new_tokens": args.max_new_tokens,
                "positions": args.positions or "absolute"}
    out = Path(args.out)
    cells, units = _run(args, model, tokenizer, trials, names, budgets, settings, out, "recall")
    rows = summarize(units, cells, trials, ("pairs",))
    lengths = {n: sorted({len(t.context) + len(t.queries[0].ids) for t in trials if t.coords["pairs"] == n})
               for n in pairs}
    title = (f"Associative recall: {args.seeds} contexts x {args.queries} queries per number of pairs, "
             f"{args.prefill} prefill")
    table = (f"# {title}\n\nAccuracy % [Wilson 95 % interval] (correct/answers). Prompt tokens (context + one "
             "query) per number of pairs: " + ", ".join(f"{n}: {v[0]}–{v[-1]}" for n, v in lengths.items())
             + ". The queries of one context share it, so they are not independent: the interval is optimistic."
             "\n\n" + accuracy_table(rows, cells, "pairs", "By number of key-value pairs"))
    _write(out, settings, rows, table)
    plot_recall(rows, names, budgets, pairs, out / "recall.png", title)
    print(f"wrote {out}/table.md, cells.csv, results.json, recall.png ({out / RESULTS} holds every answer)")


def plot_recall(rows: list[dict], names: list[str], budgets: list[int], pairs: list[int], path: Path | None,
                title: str):
    """Accuracy vs number of pairs, one panel per budget, one line per policy (bars: Wilson 95 %); full dashed. The
    title wraps to the figure's width; the legend sits below the panels. path None: the figure is returned."""
    plt = pyplot()
    width = 1.5 + 3.6 * len(budgets)
    fig, axes = plt.subplots(1, len(budgets), figsize=(width, 3.8), sharey=True, squeeze=False)
    at = {(r["policy"], r["states"], r["pairs"]): r for r in rows}

    def line(ax, name, k, **style):
        rs = [at[(name, k, n)] for n in pairs]
        acc = [r["accuracy"] for r in rs]
        err = [[a - r["low"] for a, r in zip(acc, rs)], [r["high"] - a for a, r in zip(acc, rs)]]
        ax.errorbar(pairs, acc, yerr=err, capsize=2, **style)

    for ax, k in zip(axes[0], budgets):
        line(ax, "full", None, color="black", ls="--", label="full")
        for name in names[1:]:
            line(ax, name, k, marker="o", ms=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(pairs, [str(n) for n in pairs])
        ax.set(xlabel="key-value pairs", title=f"k = {k} states per layer", ylim=(-0.03, 1.03))
    axes[0][0].set_ylabel("exact-match accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.suptitle("\n".join(textwrap.wrap(title, width=int(width * 12))), fontsize=9)  # ~12 characters an inch at 9 pt
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # the bottom tenth holds the legend
    if path is None:
        return fig
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- which layers dropped the needle ------------------------------------------------------------------------------
def trace_failures(model, tokenizer, trials, units, cells, args, out: Path) -> None:
    """For up to args.trace_failures needles a bounded cell missed while the full model found them (one per cell
    first, each cell's needle nearest the question first): rerun the prompt alone under the retention recorder and write which layers still held the needle's
    tokens when the question was asked (trace.md, trace-*.png). Exact prefill only (the recorder runs the
    recurrence)."""
    from .inspect import record_retention

    if args.prefill != "exact":
        print("msrnn: --trace-failures follows the recurrence: skipped for --prefill fast.", file=sys.stderr)
        return
    by_key = {t.key: t for t in trials}
    failed = [(name, k, t.key) for name, k in cells if k is not None
              for t in sorted(trials, key=lambda t: len(t.context) - t.span[1])  # the needle nearest the question first
              if units[("full", None, t.key)]["correct"][0] and not units[(name, k, t.key)]["correct"][0]]
    first = list({(name, k): (name, k, key) for name, k, key in reversed(failed)}.values())[::-1]  # one per cell
    picked = list(dict.fromkeys(first + failed))[: args.trace_failures]
    lines = ["# Needles the full model found and a bounded policy lost", "",
             "Which layers still held the needle's tokens when the answer began (attended by the last prompt "
             "token), from the retention recorder (msrnn/inspect.py) rerun on the same prompt. A layer holds a token "
             "while any of its kv heads does. Figures: trace-*.png.", "",
             "| policy | trial | answer | layers holding every needle token | layers holding none | "
             "dropped, tokens after the needle (median over dropped tokens) |", "|---|---|---|---:|---:|---:|"]
    for name, k, key in picked:
        trial = by_key[key]
        ids = trial.context + trial.queries[0].ids
        result = record_retention(model, ids, make_policy(name, k, args.positions), tokenizer=tokenizer)
        a, b = trial.span
        end = len(ids) - 1  # the last prompt token's step: its query gives the answer's first token
        held_until = torch.as_tensor(result.kept[:, a:b]) + torch.arange(a, b) - 1  # (L, span) last step it was seen
        held = held_until >= end  # (L, span) still in the state when the answer began
        dropped = held_until[~held] - (b - 1)
        median = f"{float(dropped.float().median()):.0f}" if dropped.numel() else "—"
        path = out / f"trace-{name}-k{k}-{key.replace('/', '-')}.png"
        plot_trace(held_until - (b - 1), end - (b - 1), result.pieces[a:b], path,
                   f"{_label(name, k)}, {key}: tokens each needle token stayed after the needle")
        lines.append(f"| {_label(name, k)} | {key} | {units[(name, k, key)]['answers'][0]!r} | "
                     f"{int(held.all(1).sum())}/{held.shape[0]} | {int((~held).all(1).sum())}/{held.shape[0]} | "
                     f"{median} |")
    if not picked:
        lines.append("| — | no needle was found by full and lost by a bounded policy | | | | |")
    (out / "trace.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/trace.md ({len(picked)} traced)", file=sys.stderr)


def plot_trace(after: torch.Tensor, end: int, pieces: list[str], path: Path, title: str) -> None:
    """Layers x needle tokens: for how many tokens after the needle each was still held (`end`: the answer's start,
    the most there is)."""
    plt = pyplot()
    L, n = after.shape
    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * n, 1.5 + 0.16 * L))
    image = ax.imshow(after.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=max(end, 1),
                      interpolation="nearest")
    ax.set_xticks(range(n), [repr(p)[1:-1] for p in pieces], rotation=90, fontsize=7)
    ax.set(xlabel="needle token", ylabel="layer", title=title)
    fig.colorbar(image, ax=ax, label=f"tokens after the needle still held ({end} = to the answer)")
    ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
