"""`msrnn eval stream`: one long text through the bounded recurrence, with PPL and memory per window.

    rows = stream_windows(model, ids, make_policy("tova", 512), window=1000)   # one dict per window of 1,000 tokens

The paper's 70,000-token experiment: a bounded state keeps memory flat however long the stream runs, and the
question is how the prediction quality holds up far past the trained context.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable

import torch

from .errors import InputError
from .eval import next_token_loss
from .policies import Policy, make_policy
from .report import current_rss_mib, peak_rss_mib, plain_log_axis, progress, pyplot, read_text, write_csv


@torch.inference_mode()
def stream_windows(model, ids: torch.Tensor, policy: Policy | None, window: int, piece: int = 128,
                   progress: Callable[[int], None] | None = None) -> list[dict]:
    """Run ONE stream ids (N,) through the model (batch 1) and report, per window of `window` logits indices, the
    PPL of the next tokens, the peak RSS and the state's bytes. The text is fed in pieces of <= `piece` tokens with
    model.prefill(mode="exact"): the recurrence itself (parallel only while nothing can be evicted), so memory is the
    state plus one piece's logits: constant for a bounded policy, O(N) for full (its state grows)."""
    N = ids.shape[0]
    state = model.init_state(1, policy)
    rows = []
    for start in range(0, N - 1, window):
        end = min(start + window, N - 1)  # logits indices [start, end) predict tokens start+1 .. end
        total = 0.0
        for a in range(start, end, piece):
            b = min(a + piece, end)
            logits, state = model.prefill(ids[None, a:b], state, policy, mode="exact", all_logits=True)
            total += float(next_token_loss(torch.log_softmax(logits[0].cpu(), -1), ids[a + 1 : b + 1]).double().sum())
            if progress:
                progress(b - a)
        rss = current_rss_mib()
        rows.append({"start": start + 1, "end": end, "ppl": math.exp(total / (end - start)),
                     "peak_rss_mib": round(peak_rss_mib(), 1), "rss_mib": rss and round(rss, 1),
                     "state_mib": round(state.nbytes() / 2**20, 4)})
    return rows


def _stream_ids(tokenizer, text: str, tokens: int) -> tuple[torch.Tensor, str]:
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise InputError("the text has fewer than 2 tokens; give a longer text.")
    note = f"the text has {len(ids)} tokens"
    if len(ids) < tokens:
        repeats = math.ceil(tokens / len(ids))
        note += f": repeated {repeats} times (concatenated) to reach {tokens} tokens"
        ids = ids * repeats
    return torch.tensor(ids[:tokens], dtype=torch.long), note


def plot_stream(res: dict, path: Path) -> None:
    """PNG: PPL per window (top) and memory (bottom) along the stream; one colour per run in both panels."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for (run, marker), color in zip(((res["policy_label"], "o"), ("full", "s")), ("C0", "C3")):  # one colour per run
        rows = res["runs"][run]
        if rows:
            ends = [r["end"] for r in rows]
            a.plot(ends, [r["ppl"] for r in rows], marker + "-", ms=3, color=color, label=run)
            b.plot(ends, [r["peak_rss_mib"] for r in rows], marker + "-", ms=3, color=color, label=f"{run}: peak RSS")
            if rows[0]["rss_mib"] is not None:
                b.plot(ends, [r["rss_mib"] for r in rows], marker + "--", ms=2, color=color, label=f"{run}: RSS now")
            b.plot(ends, [r["state_mib"] for r in rows], marker + ":", ms=2, color=color, label=f"{run}: state")
    last = max(r["end"] for rows in res["runs"].values() for r in rows)
    b.set_xlim(0, last * 1.02)  # the axis ends at the data
    for ax in (a, b):
        ax.axvline(res["max_position_embeddings"], color="gray", ls="--", lw=1)
    a.set(yscale="log", ylabel=f"PPL per {res['window']}-token window", title=res["title"])
    plain_log_axis(a.yaxis)
    b.set(xlabel="tokens into the stream", ylabel="MiB")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stream_table(res: dict) -> str:
    label, full = res["policy_label"], {r["start"]: r for r in res["runs"]["full"]}
    lines = [f"# {res['title']}", "", res["note"], "",
             f"| tokens | PPL {label} | PPL full | {label}: peak RSS / RSS / state (MiB) | "
             "full: peak RSS / RSS / state (MiB) |", "|---|---:|---:|---:|---:|"]
    for r in res["runs"][label]:
        f = full.get(r["start"])  # the full run's last window may stop short (at its --full-tokens)
        short = f" (to {f['end']})" if f and f["end"] != r["end"] else ""
        ppl_full = f"{f['ppl']:.2f}{short}" if f else "—"
        lines.append(f"| {r['start']}–{r['end']} | {r['ppl']:.2f} | {ppl_full} | {_memory(r)} | {_memory(f)} |")
    return "\n".join(lines) + "\n"


def _memory(row: dict | None) -> str:
    if row is None:
        return "—"
    now = "?" if row["rss_mib"] is None else f"{row['rss_mib']:.0f}"
    return f"{row['peak_rss_mib']:.0f} / {now} / {row['state_mib']:.3g}"


def run_stream(args, load) -> None:
    """`msrnn eval stream`; `load()` gives (model, tokenizer)."""
    if args.tokens < 2 or args.window < 1:
        raise InputError(f"--tokens {args.tokens} / --window {args.window}: give --tokens >= 2 and --window >= 1.")
    text_path = Path(args.text)
    text = read_text(text_path)
    policy = make_policy(args.policy, args.states, args.positions)  # last: it may run a policy file
    model, tokenizer = load()
    ids, note = _stream_ids(tokenizer, text, args.tokens)
    limit = model.cfg.max_position_embeddings
    full_tokens = min(limit, len(ids)) if args.full_tokens is None else min(args.full_tokens, len(ids))
    note += (f"; the full model runs on the first {full_tokens} tokens (its trained context is {limit}; "
             "--full-tokens to change)")
    print(f"msrnn eval stream: {note}", file=sys.stderr)
    label = f"{args.policy} k={args.states}" if policy is not None else "full"
    runs = {}
    with progress(len(ids) - 1 + max(full_tokens - 1, 0) * (policy is not None), "eval stream") as bar:
        runs[label] = stream_windows(model, ids, policy, args.window, progress=bar.update)  # bounded first: flat RSS
        runs["full"] = (stream_windows(model, ids[:full_tokens], None, args.window, progress=bar.update)
                        if policy is not None and full_tokens >= 2 else runs.get("full", []))
    res = {"title": f"{text_path.name}: one stream of {len(ids)} tokens, {label} vs full",
           "note": note, "policy_label": label, "window": args.window, "max_position_embeddings": limit,
           "model": model.identity, "dtype": args.dtype, "runs": runs}
    out = Path(args.out or f"out/stream-{text_path.stem}")
    out.mkdir(parents=True, exist_ok=True)
    table = stream_table(res)
    (out / "stream.md").write_text(table)
    (out / "stream.json").write_text(json.dumps(res, indent=2))
    write_csv(out / "stream.csv", [{"run": run, **r} for run, rows in runs.items() for r in rows])
    plot_stream(res, out / "stream.png")
    print(table)
    print(f"wrote {out}/stream.md, stream.csv, stream.json, stream.png")
