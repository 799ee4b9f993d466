"""`msrnn eval stream`: one long text through the bounded recurrence, with PPL and memory per window.

    runs = stream_windows(model, ids, make_policy("tova", 512), window=1000)   # [one dict per window of 1,000 tokens]

The paper's 70,000-token experiment: a bounded state keeps memory flat however long the stream runs, and the
question is how the prediction quality holds up far past the trained context. Two things make that question
answerable here:
- position schemes side by side (--positions absolute,shift,loglog,rebase): one row of a batch state per scheme,
  every row reading the same text (msrnn.batch.RowPolicies), so a comparison costs one pass, not one per scheme;
- a fresh-read control per window (--control N): the last N windows read again from an empty state, each after
  --control-warmup tokens of the text before it, with the same policy at absolute positions, all inside the
  trained context. A window that costs more in the stream than fresh costs it because of the stream's length.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable

import torch

from .batch import RowPolicies
from .errors import InputError
from .eval import next_token_loss
from .policies import POSITION_SCHEMES, Policy, make_policy
from .report import current_rss_mib, peak_rss_mib, plain_log_axis, progress, pyplot, read_text, write_csv
from .rope import rotates_at_use


def read_losses(model, state, policy: Policy | None, tokens: torch.Tensor, score_from: int = 0, piece: int = 128,
                progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Feed tokens (B, L) into `state` (updated in place) in pieces of <= `piece` tokens with
    model.prefill(mode="exact"), the recurrence itself, so that memory is the state plus one piece's logits.
    Returns (B,) float64: the summed next-token loss (nats) of the predictions at indices score_from .. L-2."""
    B, L = tokens.shape
    total = torch.zeros(B, dtype=torch.float64)
    for a in range(0, L - 1, piece):
        b = min(a + piece, L - 1)  # logits indices [a, b) predict tokens a+1 .. b
        logits, state = model.prefill(tokens[:, a:b], state, policy, mode="exact", all_logits=True)
        lo = max(score_from - a, 0)  # (B, b-a, V) -> the scored indices only
        if lo < b - a:
            logprobs = torch.log_softmax(logits[:, lo:].cpu(), -1)
            total += next_token_loss(logprobs, tokens[:, a + lo + 1 : b + 1].cpu()).double().sum(-1)
        if progress:
            progress((b - a) * B)
    return total


@torch.inference_mode()
def stream_windows(model, ids: torch.Tensor, policy: Policy | None, window: int, piece: int = 128,
                   progress: Callable[[int], None] | None = None, rows: int = 1) -> list[list[dict]]:
    """Run ONE stream ids (N,) through the model in `rows` batch rows at once (one per member of a RowPolicies,
    e.g. one per position scheme; every row reads the same text) and report per row, per window of `window`
    logits indices, the PPL of the next tokens, the peak RSS and the row's state bytes. Memory is the state plus
    one piece's logits: constant for a bounded policy, O(N) for full (its state grows). Returns [row][window]."""
    N = ids.shape[0]
    state = model.init_state(rows, policy)
    out = [[] for _ in range(rows)]
    for start in range(0, N - 1, window):
        end = min(start + window, N - 1)  # logits indices [start, end) predict tokens start+1 .. end
        loss = read_losses(model, state, policy, ids[None, start : end + 1].expand(rows, -1), 0, piece, progress)
        rss, state_mib = current_rss_mib(), round(state.nbytes() / rows / 2**20, 4)
        for r in range(rows):
            out[r].append({"start": start + 1, "end": end, "ppl": math.exp(float(loss[r]) / (end - start)),
                           "peak_rss_mib": round(peak_rss_mib(), 1), "rss_mib": rss and round(rss, 1),
                           "state_mib": state_mib})
    return out


@torch.inference_mode()
def control_windows(model, ids: torch.Tensor, policy: Policy | None, windows: list[tuple[int, int]], warmup: int,
                    batch: int = 8, piece: int = 128, progress: Callable[[int], None] | None = None) -> list[dict]:
    """The fresh-read control of each window (start, end) of logits indices: tokens max(0, start-warmup) .. end read
    from an EMPTY state, the first `warmup` (the text just before the window) unscored, so the window is predicted
    from a state that has already been filled and evicted from like the stream's, but without the stream's length.
    Windows of equal length run together, `batch` rows at a time. Returns one dict per window, in order."""
    out = {}
    spans = [(s, e, max(0, s - warmup)) for s, e in windows]
    by_length = {}
    for s, e, a in spans:
        by_length.setdefault((e + 1 - a, s - a), []).append((s, e, a))  # same length and warm-up: one batch
    for (length, warm), group in by_length.items():
        for i in range(0, len(group), batch):
            part = group[i : i + batch]
            tokens = torch.stack([ids[a : e + 1] for s, e, a in part])  # (B, length)
            state = model.init_state(len(part), policy)
            loss = read_losses(model, state, policy, tokens, warm, piece, progress)
            for (s, e, a), l in zip(part, loss.tolist()):
                out[s] = {"start": s + 1, "end": e, "ppl": math.exp(l / (e - s)), "warmup": s - a}
    return [out[s] for s, _ in windows]


def control_cost(N: int, window: int, count: int, warmup: int) -> list[tuple[int, int]]:
    """The last `count` windows of a stream of N tokens (logits indices [start, end)) and nothing else."""
    starts = list(range(0, N - 1, window))
    return [(s, min(s + window, N - 1)) for s in starts[len(starts) - min(count, len(starts)):]]


def parse_positions(text: str | None) -> list[str]:
    """--positions "absolute,shift" -> ["absolute", "shift"]; None -> ["absolute"]; anything else one InputError."""
    if text is None:
        return ["absolute"]
    schemes = [s.strip() for s in text.split(",")]
    bad = [s for s in schemes if s not in POSITION_SCHEMES]
    if bad or not schemes:
        raise InputError(f"--positions {text!r}: {', '.join(map(repr, bad)) or 'nothing'} is not a position scheme; "
                         f"give one or more of {', '.join(POSITION_SCHEMES)}, comma-separated (e.g. absolute,shift).")
    if len(set(schemes)) != len(schemes):
        raise InputError(f"--positions {text!r} names a scheme twice; give each once.")
    return schemes


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


def pooled(rows: list[dict]) -> float:
    """The PPL of several windows together: exp of the mean loss per token, weighting each window by its tokens."""
    tokens = [r["end"] - r["start"] + 1 for r in rows]
    return math.exp(sum(n * math.log(r["ppl"]) for n, r in zip(tokens, rows)) / sum(tokens))


def summary(res: dict) -> list[dict]:
    """Per run: PPL over the controlled windows in the stream and fresh, and their ratio (the target: <= 1.10)."""
    control = res["control"]
    if not control:
        return []
    starts = {c["start"] for c in control}
    fresh = pooled(control)
    out = []
    for label in res["labels"]:
        rows = [r for r in res["runs"][label] if r["start"] in starts]
        out.append({"run": label, "tokens": f"{control[0]['start']}–{control[-1]['end']}", "stream_ppl": pooled(rows),
                    "control_ppl": fresh, "ratio": pooled(rows) / fresh})
    return out


def plot_stream(res: dict, path: Path) -> None:
    """PNG: PPL per window (top; the control dashed) and memory (bottom) along the stream; one colour per run."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=(2, 1))
    markers = "o^vD<>ps"
    for i, run in enumerate(dict.fromkeys([*res["labels"], "full"])):
        rows, color = res["runs"].get(run), "C3" if run == "full" else f"C{i if i < 3 else i + 1}"
        if rows:
            ends = [r["end"] for r in rows]
            marker = "s" if run == "full" else markers[i % len(markers)]
            a.plot(ends, [r["ppl"] for r in rows], marker + "-", ms=3, lw=1, color=color, label=run)
            b.plot(ends, [r["state_mib"] for r in rows], marker + ":", ms=2, color=color, label=f"{run}: state")
    if res["control"]:
        a.plot([c["end"] for c in res["control"]], [c["ppl"] for c in res["control"]], "k--", lw=1.5,
               label=f"control: fresh read after {res['control_warmup']} tokens")
    rss = res["runs"][res["labels"][0]]
    b.plot([r["end"] for r in rss], [r["peak_rss_mib"] for r in rss], "k-", lw=1, label="peak RSS (process)")
    if rss[0]["rss_mib"] is not None:
        b.plot([r["end"] for r in rss], [r["rss_mib"] for r in rss], "k--", lw=1, label="RSS now (process)")
    last = max(r["end"] for rows in res["runs"].values() for r in rows)
    b.set_xlim(0, last * 1.02)  # the axis ends at the data
    for ax in (a, b):
        ax.axvline(res["max_position_embeddings"], color="gray", ls="--", lw=1)
    a.set(yscale="log", ylabel=f"PPL per {res['window']}-token window", title=res["title"])
    plain_log_axis(a.yaxis)
    b.set(xlabel="tokens into the stream", ylabel="MiB", yscale="log")
    a.legend(fontsize=7)
    b.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stream_table(res: dict) -> str:
    labels, control = res["labels"], {c["start"]: c for c in res["control"]}
    full = {r["start"]: r for r in res["runs"].get("full", [])}
    lines = [f"# {res['title']}", "", res["note"], ""]
    if res["summary"]:
        lines += [f"## Stream vs fresh read (tokens {res['summary'][0]['tokens']})", "",
                  "| run | PPL in the stream | PPL fresh (control) | stream / fresh |", "|---|---:|---:|---:|"]
        lines += [f"| {s['run']} | {s['stream_ppl']:.2f} | {s['control_ppl']:.2f} | {s['ratio']:.3f} |"
                  for s in res["summary"]]
        lines.append("")
    head = " | ".join(f"PPL {label}" for label in labels)
    ratios = " | ".join(f"{label} / control" for label in labels) if control else ""
    lines += ["## Per window", "",
              f"| tokens | {head} |" + (" PPL full |" if full else "") + (f" PPL control | {ratios} |" if control else "")
              + " peak RSS / RSS (MiB) | state per row (MiB) |",
              "|---|" + "---:|" * (len(labels) + bool(full) + (1 + len(labels) if control else 0) + 2)]
    for i, r in enumerate(res["runs"][labels[0]]):
        row = [res["runs"][label][i] for label in labels]
        f, c = full.get(r["start"]), control.get(r["start"])
        short = f" (to {f['end']})" if f and f["end"] != r["end"] else ""
        cells = [f"{r['start']}–{r['end']}", *(f"{x['ppl']:.2f}" for x in row)]
        if full:
            cells.append(f"{f['ppl']:.2f}{short}" if f else "—")
        if control:
            cells += [f"{c['ppl']:.2f}" if c else "—", *((f"{x['ppl'] / c['ppl']:.3f}" if c else "—") for x in row)]
        now = "?" if r["rss_mib"] is None else f"{r['rss_mib']:.0f}"
        cells += [f"{r['peak_rss_mib']:.0f} / {now}", f"{r['state_mib']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_stream(args, load) -> None:
    """`msrnn eval stream`; `load()` gives (model, tokenizer)."""
    if args.tokens < 2 or args.window < 1:
        raise InputError(f"--tokens {args.tokens} / --window {args.window}: give --tokens >= 2 and --window >= 1.")
    if args.control < 0 or args.control_warmup < 0 or args.control_batch < 1:
        raise InputError(f"--control {args.control} / --control-warmup {args.control_warmup} / --control-batch "
                         f"{args.control_batch}: give counts >= 0 (the batch >= 1).")
    schemes = parse_positions(args.positions)
    text_path = Path(args.text)
    text = read_text(text_path)
    policies = [make_policy(args.policy, args.states, s if args.positions else None) for s in schemes]  # may run a file
    bounded = policies[0] is not None
    if not bounded and (len(schemes) > 1 or args.control):
        raise InputError("--policy full has no position scheme to compare and is its own control; give a bounded "
                         "policy (e.g. --policy tova --states 512) for --positions lists and --control.")
    model, tokenizer = load()
    limit = model.cfg.max_position_embeddings
    if args.control and args.window + args.control_warmup > limit:
        raise InputError(f"--window {args.window} + --control-warmup {args.control_warmup} > {limit}, the trained "
                         "context: the control would itself run past it. Give a smaller window or warm-up.")
    ids, note = _stream_ids(tokenizer, text, args.tokens)
    full_tokens = min(limit, len(ids)) if args.full_tokens is None else min(args.full_tokens, len(ids))
    note += (f"; the full model runs on the first {full_tokens} tokens (its trained context is {limit}; "
             "--full-tokens to change)")
    name = f"{args.policy} k={args.states}" if bounded else "full"
    labels = [f"{name} {s}" if args.positions else name for s in schemes]
    # schemes that cache rotated keys and schemes that rotate at use run as two batches (a mixed batch would rotate
    # every row at use, ~5x the cost of a cached row)
    groups = [[i for i, p in enumerate(policies) if bounded and rotates_at_use(p.positions) == at_use]
              for at_use in (False, True)]
    groups = [g for g in groups if g] or [[0]]
    windows = control_cost(len(ids), args.window, args.control, args.control_warmup) if args.control else []
    control_policy = make_policy(args.policy, args.states, "absolute") if windows else None
    note += (f"; control: the last {len(windows)} windows read fresh, each after {args.control_warmup} tokens of "
             f"warm-up, {args.policy} k={args.states} at absolute positions" if windows else "")
    print(f"msrnn eval stream: {note}", file=sys.stderr)
    steps = (len(ids) - 1) * len(policies) + max(full_tokens - 1, 0) * bounded + sum(
        e + 1 - max(0, s - args.control_warmup) - 1 for s, e in windows)
    runs = {}
    with progress(steps, "eval stream", unit="token") as bar:
        for group in groups:  # bounded first: flat RSS
            members = [policies[i] for i in group]
            policy = members[0] if len(members) == 1 else RowPolicies(members, rows=1)
            for i, rows in zip(group, stream_windows(model, ids, policy, args.window, progress=bar.update,
                                                     rows=len(members))):
                runs[labels[i]] = rows
        if bounded and full_tokens >= 2:
            runs["full"] = stream_windows(model, ids[:full_tokens], None, args.window, progress=bar.update)[0]
        runs = {label: runs[label] for label in [*labels, "full"] if label in runs}  # in --positions order
        control = control_windows(model, ids, control_policy, windows, args.control_warmup, args.control_batch,
                                  progress=bar.update)
    res = {"title": f"{text_path.name}: one stream of {len(ids)} tokens, {', '.join(labels)}"
                    + (" vs full" if "full" in runs else ""),
           "note": note, "labels": labels, "window": args.window, "max_position_embeddings": limit,
           "model": model.identity, "dtype": args.dtype, "runs": runs, "control": control,
           "control_warmup": args.control_warmup}
    res["summary"] = summary(res)
    out = Path(args.out or f"out/stream-{text_path.stem}")
    out.mkdir(parents=True, exist_ok=True)
    table = stream_table(res)
    (out / "stream.md").write_text(table)
    (out / "stream.json").write_text(json.dumps(res, indent=2))
    write_csv(out / "stream.csv", [{"run": run, "warmup": "", **r} for run, rows in runs.items() for r in rows]
              + [{"run": "control", "peak_rss_mib": "", "rss_mib": "", "state_mib": "", **c} for c in control])
    plot_stream(res, out / "stream.png")
    print(table)
    print(f"wrote {out}/stream.md, stream.csv, stream.json, stream.png")
