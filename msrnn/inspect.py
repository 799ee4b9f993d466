"""Which tokens does a bounded multi-state keep, and for how long? (the paper's retention analysis)

A policy with budget k decides, after every step, which k (key, value) states of each layer survive. Reading the
positions held by `state.layers[i].pos` after each step tells, for every token and layer, how many steps the token
stayed in the state:

    kept = the number of steps whose query attended to the token = (step it was evicted in) - (step it entered) + 1,
           or (last step) - (step it entered) + 1 if it survived to the end of the text.

So with `window` and k states a token that does not reach the end is kept exactly k + 1 steps: it enters at its own
step t, is held after steps t..t+k-1, and is attended once more, by the query of step t + k, which then drops it.
A token TOVA drops at its own step counts 1; a token dropped by the last step counts like one that survived (the
last query attended to both). A layer keeps a token while ANY of its kv heads does (head-wise policies may disagree
between heads; `kept_heads` has the per-head counts).

    result = record_retention(model, tokenizer.encode(text), make_policy("tova", 64), tokenizer=tokenizer)
    result.kept            # (layers, tokens) steps kept
    result.by_kind()       # mean retention of first token, punctuation, newline, 's, closing quote, proper noun...

`msrnn inspect` (run_inspect) writes an HTML page with every token shaded by its retention, a PNG heatmap
(layers x tokens) and the per-kind table.
"""
from __future__ import annotations

import functools
import html
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import report
from .errors import InputError
from .policies import Policy
from .state import EMPTY

KINDS = ("first token", "newline", "possessive 's", "closing quote", "punctuation", "proper noun", "other")
ABBREVIATIONS = ("Mr.", "Mrs.", "Ms.", "Dr.", "St.")  # a period that does not end a sentence
SHADE = "200,30,30"  # RGB of the HTML highlight; its opacity grows with retention, up to MAX_ALPHA (text stays legible)
MAX_ALPHA = 0.85


# --- recording ------------------------------------------------------------------------------------------------------
class RetentionRecorder:
    """Watches a state step by step: for every layer, kv head and token, the last step after which it was held.

    The model calls `observe(layer, step, pos)` after each step of each layer (set it as every LayerState's
    `trace`); after a parallel part nothing was evicted, so one call for its last step covers it. Batch row 0 only.
    """

    def __init__(self, num_layers: int, kv_heads: int, num_tokens: int):
        entered = torch.arange(num_tokens)  # token t enters the state at step t
        self.last = (entered - 1).expand(num_layers, kv_heads, num_tokens).clone()  # (L, Hkv, T): not held yet
        self.steps = 0  # steps observed so far

    def observe(self, layer: int, step: torch.Tensor, pos: torch.Tensor) -> None:
        """The model's trace hook (LayerState.trace): after the step of the token at position step[0], layer
        `layer` holds the positions pos (B, Hkv, n) (EMPTY = not held)."""
        pos = pos[0].cpu()  # (Hkv, n) row 0
        held = pos != EMPTY
        heads = torch.arange(pos.shape[0])[:, None].expand_as(pos)  # (Hkv, n)
        self.last[layer][heads[held], pos[held]] = int(step[0])
        self.steps = max(self.steps, int(step[0]) + 1)

    def kept_heads(self) -> torch.Tensor:
        """(L, Hkv, T) steps each token was kept by each kv head, counted as in the module docstring."""
        end = self.steps - 1
        entered = torch.arange(self.last.shape[-1])
        return (self.last + 1).clamp(max=end) - entered + 1  # evicted at step last+1, or held until `end`


@dataclass
class RetentionResult:
    """How long every token stayed in every layer's multi-state (one text, one policy)."""

    tokens: list[int]
    pieces: list[str]  # the tokenizer's string for each token (decoded one id at a time)
    kept: np.ndarray  # (L, T) int steps kept per layer: while ANY kv head keeps the token
    kept_heads: np.ndarray  # (L, Hkv, T) int steps kept per kv head
    policy: str
    states: int | None

    @property
    def available(self) -> np.ndarray:
        """(T,) the most steps token t could be kept: from its step to the end of the text."""
        return len(self.tokens) - np.arange(len(self.tokens))

    def retention(self, layer: int | None = None) -> np.ndarray:
        """(T,) float steps kept, averaged over layers (layer=None) or of one layer."""
        return self.kept.mean(axis=0) if layer is None else self.kept[layer].astype(float)

    def share(self, layer: int | None = None) -> np.ndarray:
        """(T,) the share of the steps it could stay (from its own step to the end of the text) that each token
        stayed, in [0, 1]: a token near the end is not counted as evicted early because the text ended."""
        return self.retention(layer) / self.available

    def kinds(self) -> list[str]:
        return [token_kind(self.pieces, i) for i in range(len(self.pieces))]

    def by_kind(self, layer: int | None = None) -> list[dict]:
        """One row per token kind present: how many tokens, mean steps kept, and mean share of the steps available
        (the share does not penalise tokens near the end of the text, which could not be kept long)."""
        kept, kinds = self.retention(layer), np.array(self.kinds())
        share = kept / self.available
        rows = []
        for kind in KINDS:
            mask = kinds == kind
            if mask.any():
                rows.append({"kind": kind, "tokens": int(mask.sum()), "mean_kept": float(kept[mask].mean()),
                             "mean_share": float(share[mask].mean())})
        return rows


def record_retention(model, tokens, policy: Policy | None, tokenizer=None, progress: bool = False) -> RetentionResult:
    """Run `tokens` (a list of ids) through the recurrence with `policy` and record every token's retention.

    The text goes through `prefill(mode="exact")` (the recurrence, layer-major); every layer reports what it holds
    after each step through its trace hook (LayerState.trace).
    """
    ids = torch.as_tensor(list(tokens), dtype=torch.int64)
    if ids.dim() != 1 or len(ids) == 0:
        raise InputError("record_retention needs a non-empty flat list of token ids (one text).")
    T, cfg = len(ids), model.cfg
    recorder = RetentionRecorder(cfg.num_hidden_layers, cfg.num_key_value_heads, T)
    state = model.init_state(1, policy)
    for i, layer in enumerate(state.layers):
        layer.trace = functools.partial(recorder.observe, i)
    with report.progress(T, "retention", unit="tok", disable=not progress) as bar:
        model.prefill(ids[None], state, policy, mode="exact", progress=bar.update)
    budget = getattr(policy, "states", None)
    heads = recorder.kept_heads()  # (L, Hkv, T)
    pieces = [tokenizer.decode([int(i)]) for i in ids] if tokenizer is not None else [str(int(i)) for i in ids]
    return RetentionResult(ids.tolist(), pieces, heads.max(dim=1).values.numpy(), heads.numpy(),
                           getattr(policy, "name", "full"), budget)


# --- token kinds ----------------------------------------------------------------------------------------------------
def token_kind(pieces: list[str], i: int) -> str:
    """The kind of token i, one of KINDS, from its string and its neighbours' (a heuristic, in KINDS order):
    the first token; any token holding a newline; the clitic 's ("'s", or "s" right after an apostrophe token);
    a closing quote (” always; " ’ ' when glued to the word before, and ’ ' only if no letter follows);
    other punctuation (only punctuation/symbol characters); a capitalised word that does not start a sentence
    (proper noun, "I" excluded); anything else."""
    piece = pieces[i]
    core = piece.strip()
    prev = pieces[i - 1] if i > 0 else ""
    after = pieces[i + 1] if i + 1 < len(pieces) else ""
    if i == 0:
        return "first token"
    if "\n" in piece:
        return "newline"
    if core.lower() in ("'s", "’s") or (piece.lower() == "s" and prev in ("'", "’") and not after[:1].isalpha()):
        return "possessive 's"
    if core and all(unicodedata.category(c)[0] in "PS" for c in core):
        return "closing quote" if _closes_quote(piece, prev, after) else "punctuation"
    if core[:1].isupper() and core != "I" and _starts_word(piece, prev) and not _starts_sentence(pieces, i):
        return "proper noun"
    return "other"


def _closes_quote(piece: str, prev: str, after: str) -> bool:
    last = piece.rstrip()[-1]
    glued = not piece[0].isspace() and not prev[-1:].isspace()  # no space between the word and the quote
    if last == "”":
        return True
    if last == '"':
        return glued
    return last in "'’" and glued and not after[:1].isalpha()  # ’ followed by a letter is an apostrophe (I’m)


def _starts_word(piece: str, prev: str) -> bool:
    return piece[0].isspace() or not prev[-1:].isalnum()


def _starts_sentence(pieces: list[str], i: int) -> bool:
    before = "".join(pieces[max(0, i - 4) : i]) + pieces[i][: len(pieces[i]) - len(pieces[i].lstrip())]
    text = before.rstrip()
    if not text or "\n\n" in before[len(text) :]:
        return True  # start of the text or of a paragraph
    return text[-1] in ".!?“\"‘([_" and not text.endswith(ABBREVIATIONS)


# --- outputs --------------------------------------------------------------------------------------------------------
def retention_html(result: RetentionResult, layer: int | None = None, title: str = "Token retention") -> str:
    """A page with every token shaded by the share of its available steps it was kept (darker = a larger share), a
    legend and the kind table."""
    kept, kinds = result.retention(layer), result.kinds()
    alpha = MAX_ALPHA * result.share(layer)
    spans = []
    for t, (piece, k, a, kind) in enumerate(zip(result.pieces, kept, alpha, kinds)):
        tip = f"#{t} {piece!r} ({kind}): kept {k:.1f} of the {result.available[t]} steps it could stay"
        cls = ' class="nl"' if "\n" in piece else ""
        spans.append(f'<span{cls} style="background: rgba({SHADE},{a:.3f})" title="{html.escape(tip)}">'
                     f"{html.escape(piece)}</span>")
    where = "averaged over layers" if layer is None else f"layer {layer}"
    budget = "unbounded" if result.states is None else f"{result.states} states"
    ticks = "".join(f"<span>{v}</span>" for v in ("0", "0.5", "1"))
    rows = "".join(f"<tr><td>{html.escape(r['kind'])}</td><td>{r['tokens']}</td><td>{r['mean_kept']:.1f}</td>"
                   f"<td>{r['mean_share']:.2f}</td></tr>" for r in result.by_kind(layer))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: Georgia, serif; max-width: 60em; margin: 2em auto; line-height: 1.7; }}
.text {{ white-space: pre-wrap; border: 1px solid #ccc; padding: 1em; }}
.nl::before {{ content: "\\21b5"; color: #999; }}
.legend {{ display: flex; align-items: center; gap: 1em; }}
.bar {{ width: 20em; height: 1em; background: linear-gradient(to right, rgba({SHADE},0), rgba({SHADE},{MAX_ALPHA})); }}
.ticks {{ width: 20em; display: flex; justify-content: space-between; font-size: 80%; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Policy <b>{html.escape(result.policy)}</b>, {budget}, {len(result.tokens)} tokens; retention {where}.
A token is shaded by the share of the steps it could stay in the multi-state (from its own step to the end of the
text) that it stayed: 1 = kept to the end, so a token near the end is not shown as evicted because the text ended
(hover for the numbers of steps).</p>
<div class="legend"><span>share of the steps it could stay:</span><div><div class="bar"></div><div class="ticks">{ticks}</div></div></div>
<div class="text">{"".join(spans)}</div>
<h2>Retention by token kind</h2>
<table><tr><th>kind</th><th>tokens</th><th>mean steps kept</th><th>mean share of available steps</th></tr>
{rows}</table>
</body></html>
"""


def plot_heatmap(result: RetentionResult, path: str | Path) -> None:
    """PNG: layers (rows) x tokens (columns), colour = the share of the steps it could stay (from its step to the
    end of the text) that the token stayed in that layer (tokens near the end are not dark only because the text
    ended)."""
    plt = report.pyplot()

    L, T = result.kept.shape
    fig, ax = plt.subplots(figsize=(min(24.0, 4 + T / 20), 1.5 + 0.18 * L))
    image = ax.imshow(result.kept / result.available, aspect="auto", interpolation="nearest", cmap="magma_r",
                      vmin=0, vmax=1)
    if T <= 80:  # few enough tokens to name them
        ax.set_xticks(range(T), [repr(p)[1:-1] for p in result.pieces], rotation=90, fontsize=7)
    ax.set_xlabel("token position")
    ax.set_ylabel("layer")
    budget = "unbounded" if result.states is None else f"k={result.states}"
    ax.set_title(f"Share of the steps it could stay that each token stayed in the state ({result.policy}, {budget})")
    fig.colorbar(image, ax=ax, label="share of available steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def kind_table_markdown(rows: list[dict]) -> str:
    lines = ["| kind | tokens | mean steps kept | mean share of available steps |", "|---|---:|---:|---:|"]
    lines += [f"| {r['kind']} | {r['tokens']} | {r['mean_kept']:.1f} | {r['mean_share']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(result: RetentionResult, out: str | Path, layer: int | None = None) -> list[Path]:
    """Write retention.html, retention.png, retention_by_kind.md/.csv and tokens.csv into `out`; return the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in ("retention.html", "retention.png", "retention_by_kind.md",
                                     "retention_by_kind.csv", "tokens.csv")]
    rows = result.by_kind(layer)
    paths[0].write_text(retention_html(result, layer), encoding="utf-8")
    plot_heatmap(result, paths[1])
    paths[2].write_text(kind_table_markdown(rows), encoding="utf-8")
    report.write_csv(paths[3], rows)
    kept, kinds = result.retention(layer), result.kinds()
    report.write_csv(paths[4], [{"position": t, "id": i, "piece": p, "kind": kinds[t], "kept": round(float(kept[t]), 3),
                          "available": int(result.available[t])}
                         for t, (i, p) in enumerate(zip(result.tokens, result.pieces))])
    return paths


def run_inspect(args, load) -> None:
    """`msrnn inspect`; `load()` gives (model, tokenizer)."""
    from .policies import make_policy

    text = report.read_text(args.text)
    if args.tokens < 1:
        raise InputError(f"--tokens {args.tokens}: give at least 1 token.")
    policy = make_policy(args.policy, args.states, args.positions)
    model, tokenizer = load()
    layers = model.cfg.num_hidden_layers
    if args.layer is not None and not 0 <= args.layer < layers:
        raise InputError(f"--layer {args.layer} is out of range: this model has layers 0..{layers - 1}.")
    ids = tokenizer.encode(text)[: args.tokens]
    if not ids:
        raise InputError(f"--text {args.text} is empty: there is nothing to inspect.")
    result = record_retention(model, ids, policy, tokenizer=tokenizer, progress=True)
    paths = write_report(result, args.out, args.layer)
    print(summary(result, args.layer))
    print(f"wrote {paths[0]}, " + ", ".join(p.name for p in paths[1:]))


def summary(result: RetentionResult, layer: int | None = None) -> str:
    """What `msrnn inspect` prints: one line of totals, then the table by token kind."""
    budget = "unbounded" if result.states is None else f"{result.states} states"
    where = "mean over layers" if layer is None else f"layer {layer}"
    return (f"{result.policy}, {budget}, {len(result.tokens)} tokens, {where}: mean share of available steps "
            f"{result.share(layer).mean():.3f}, mean steps kept {result.retention(layer).mean():.1f}\n\n"
            + kind_table_markdown(result.by_kind(layer)))
