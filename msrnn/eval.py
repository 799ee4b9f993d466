"""Evaluation: the paper's language-modelling experiments (perplexity of a bounded multi-state RNN).

    from msrnn import load, make_policy
    from msrnn.eval import perplexity, compare
    model, tok = load()                                                   # the bundled SmolLM2-135M
    tokens = torch.tensor(tok.encode(text)[:2048])                        # one chunk; (B, T) for B chunks
    losses = perplexity(model, tokens, policy=make_policy("tova", 256))   # tokens (T,) -> losses (T-1,) fp32
    ppl = losses.mean().exp()                                             # exp of the mean cross-entropy
    s = compare(model, tokens, make_policy("tova", 256))                  # + top-1 agreement and KL to `full`
    s.ppl, s.agreement, s.mean_kl                                         # floats; s.loss, s.agree, s.kl per token

What is measured (the paper's setting, section 5): a text is tokenized (no BOS unless the tokenizer adds one), cut
into chunks of `context` tokens (the paper cuts PG-19 into 4,096-token chunks), and every chunk is run through the
recurrence from an EMPTY state with the policy; the cross-entropy of every next token is accumulated and
PPL = exp(mean cross-entropy over all scored tokens of all chunks). Next to the loss, two distances to the unbounded
model (`full`, the ordinary transformer) on the same text: top-1 agreement (does the policy's argmax equal the full
model's?) and KL(full || policy) of the next-token distributions, both per token, in nats for the KL.

Shapes: B chunks of T tokens; logits index t (after token t) predicts token t+1, so a chunk has T-1 next tokens,
positions 1..T-1. With a prompt of P tokens (below) the scored next tokens are positions max(P,1)..T-1, N of them;
every per-token tensor returned here is (B, N), or (N,) for a 1-D input.

exact vs fast (`prefill=`). `exact` is the recurrence itself: every token is fed one at a time and the policy evicts
after every token (model.prefill(mode="exact") / the paper's Algorithm 1). `fast` is how kvpress and the official
TOVA code use a policy: a prompt is consumed in ONE parallel pass with full attention, compressed ONCE down to k by
the last prompt token's attention (model.prefill(mode="fast")), and only what follows is decoded token by token with
eviction. For an evaluation, `fast` therefore means: the first P tokens of each chunk are a prompt (default P = T//2)
read the fast way, and the rest is decoded. The prompt's own next tokens are predicted by the parallel pass with
full attention, so they say nothing about the policy: only positions P..T-1 are scored. To compare the two modes
on the same tokens, give the exact run the same prompt (`--prompt P`): exact with a prompt is the same recurrence,
merely scored on P..T-1. Default prompt: 0 for exact (every next token is scored, as in the paper),
T//2 for fast. The prompt is part of every result file, so runs with different prompts are never mixed.

Why it is fast (every shortcut computes the same function, up to the order of float sums):
- `full` once: the unbounded model's log-probabilities come from one parallel pass per batch of chunks (a chunked
  prefill: model(tokens) in pieces of 256 tokens, half the time of one (T x T) attention at T = 2,048); its
  perplexity, and the reference for agreement and KL of every policy, are read from it.
- The shared prefix: before a policy has to evict, it IS the full model. Under budget k (exact) the first k
  tokens never trigger an eviction, and the prediction at index k still attends to everything, so positions
  1..k of a policy are copied from `full`, and the state after the smallest budget's prefix is one parallel
  prefill shared by every policy that keeps no running score (H2O prefills its own, to accumulate its score). In
  fast mode the prefix is the prompt (or k, whichever is longer); the single eviction happens at its last token.
- One step serves every cell: all policies x all budgets x the chunks of a batch are ONE batch state (6 x 4 x 2
  = 48 rows for the paper's grid on two chunks). `RowPolicies` asks each member policy about its own rows and
  gives each row its own budget k (a smaller budget leaves holes that attention masks out). A step's
  cost grows much slower than its rows: the matrix products run at 13 GFLOP/s with 2 rows, 17 with 12 and 32
  with 48 on one core of the 2-core test machine, so one step of 48 rows costs far less than 24 steps of 2.
- Nothing of size (T, vocab) is kept per policy: losses, agreement and KL are reduced at every step; only the
  reference (B, T-1, vocab) fp32 log-probabilities of the current batch of chunks are held (402 MB per 2,048-token
  chunk of a 49,152-token vocabulary; `--batch` bounds it).

`msrnn eval ppl` runs the grid policies x budgets and writes the paper's Table 3 layout (markdown, CSV, JSON, PNG);
`msrnn eval stream` runs one long stream far past the trained context and reports PPL and memory per window.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .batch import RowPolicies
from .errors import InputError
from .model import PREFILL_MODES
from .policies import POLICIES, PerLayer, Policy, layer_budgets, make_policy, parse_spec, parse_states, policy_class
from .report import plain_log_axis, progress, pyplot, read_text, write_csv
from .state import State

DEFAULT_POLICIES = "full,baseline,window,sinks,h2o,tova-head,tova"
DEFAULT_BATCH = 2  # chunks per batch state: 2 x 24 cells = 48 rows, past which a step gains little per row


# --- per-token measures -------------------------------------------------------------------------------------------
def next_token_loss(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the true next token: logprobs (..., V), targets (...) -> (...) fp32 nats."""
    return -logprobs.gather(-1, targets[..., None])[..., 0]


def top1_agreement(full_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """(..., V), (..., V) -> (...) bool: does the policy predict the same most likely token as the full model?"""
    return full_logprobs.argmax(-1) == logprobs.argmax(-1)


def kl_full_policy(full_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(full || policy) per position, in nats: sum_v p_full(v) (log p_full(v) - log p_policy(v)). Inputs are
    log-softmaxed logits (..., V) in fp32; the result (...) is >= 0 up to rounding (~1e-7)."""
    return (full_logprobs.exp() * (full_logprobs - logprobs)).sum(-1)


@dataclass
class Reference:
    """The unbounded model on a batch of chunks, computed once and reused by every policy.

    logprobs (B, T-1, V) fp32: next-token log-probabilities at indices 0..T-2; loss (B, T-1); top1 (B, T-1).
    Computed as a chunked prefill of the unbounded state, `piece` tokens per call: the same function as
    model(tokens), but the attention of a call is (piece x S) instead of (T x T), twice as fast at T = 2,048."""

    logprobs: torch.Tensor
    loss: torch.Tensor
    top1: torch.Tensor
    neg_entropy: torch.Tensor | None = None  # (B, T-1) sum_v p log p of the full model

    @classmethod
    @torch.inference_mode()
    def compute(cls, model, tokens: torch.Tensor, piece: int = 256, progress=None) -> "Reference":
        """progress: called with the tokens of each piece once it is done (a progress bar's update)."""
        B, T = tokens.shape
        logprobs, state = torch.empty(B, T - 1, model.cfg.vocab_size), None
        for a in range(0, T - 1, piece):
            logits, state = model.prefill(tokens[:, a : min(a + piece, T - 1)], state, None, all_logits=True)
            logprobs[:, a : a + piece] = torch.log_softmax(logits, dim=-1).cpu()  # (B, piece, V)
            if progress is not None:
                progress(min(piece, T - 1 - a))
        neg_entropy = (logprobs.exp() * logprobs).sum(-1)  # (B, T-1)
        return cls(logprobs, next_token_loss(logprobs, tokens[:, 1:]), logprobs.argmax(-1), neg_entropy)

    def copies(self, P: int) -> "Scores":
        """What P policies score while they still equal the full model: (P, B, T-1) each, to be overwritten."""
        return Scores(self.loss.repeat(P, 1, 1), torch.ones(P, *self.top1.shape, dtype=torch.bool),
                      torch.zeros(P, *self.loss.shape))

    def measure(self, into: "Scores", logits: torch.Tensor, tokens: torch.Tensor, start: int) -> None:
        """Write the measures of logits (P, B, n, V) at indices start..start+n-1 into `into` (P, B, T-1).

        With z the logits and lse = log sum exp z, log p = z - lse, so the loss is lse - z[target] and
        KL(full || policy) = sum p_full log p_full - sum p_full z + lse (p_full sums to 1): a few passes over the
        (P, B, n, V) logits (max, exp-sum, gather, the product with p_full) instead of a log_softmax copy."""
        n = logits.shape[2]
        at = slice(start, start + n)
        top, argmax = logits.max(dim=-1)  # (P, B, n) each
        lse = top + (logits - top[..., None]).exp_().sum(dim=-1).log()  # (P, B, n) log sum exp, stable
        target = tokens[:, start + 1 : start + n + 1].expand(logits.shape[:3])  # (P, B, n)
        into.loss[..., at] = lse - logits.gather(-1, target[..., None])[..., 0]
        into.agree[..., at] = argmax == self.top1[:, at]
        p_full = self.logprobs[:, at].exp()  # (B, n, V)
        cross = torch.einsum("pbnv,bnv->pbn", logits, p_full)  # (P, B, n) sum_v p_full z
        into.kl[..., at] = (self.neg_entropy[:, at] - cross + lse).clamp(min=0)


@dataclass
class Scores:
    """One policy's per-token results on B chunks: each tensor (B, N) over the N scored next tokens (inside the
    engine also (P, B, T-1): P policies, every index)."""

    loss: torch.Tensor  # fp32 cross-entropy of the true next token, nats
    agree: torch.Tensor  # bool: top-1 equals the full model's top-1
    kl: torch.Tensor  # fp32 KL(full || policy), nats

    @property
    def ppl(self) -> float:
        return math.exp(float(self.loss.double().mean()))

    @property
    def agreement(self) -> float:
        return float(self.agree.double().mean())

    @property
    def mean_kl(self) -> float:
        return float(self.kl.double().mean())

    def part(self, *index) -> "Scores":
        """The same index applied to the three tensors, e.g. part(j) = policy j of a (P, B, T-1) group."""
        return Scores(self.loss[index], self.agree[index], self.kl[index])

    def sums(self) -> dict:
        """What a results file stores: totals, so that batches of chunks add up exactly, and the same per chunk
        (row), for intervals over chunks."""
        tensors = (self.loss, self.agree, self.kl)
        per_chunk = [t.reshape(-1, t.shape[-1]) for t in tensors]  # (chunks, N)
        return {"tokens": self.loss.numel(), "loss": float(self.loss.double().sum()),
                "agree": int(self.agree.sum()), "kl": float(self.kl.double().sum()),
                "chunk_tokens": [per_chunk[0].shape[1]] * per_chunk[0].shape[0],
                "chunk_loss": per_chunk[0].double().sum(-1).tolist(),
                "chunk_agree": per_chunk[1].sum(-1).tolist(), "chunk_kl": per_chunk[2].double().sum(-1).tolist()}


# --- the engine ----------------------------------------------------------------------------------------------------
def _as_batch(tokens) -> torch.Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise InputError(f"tokens must be (T,) or (B, T) with T >= 2 (a next token to predict); "
                         f"got shape {tuple(tokens.shape)}.")
    return tokens.long()


def _check_run(prefill: str, prompt: int | None, T: int) -> int:
    """Validate the mode and return the prompt length P (default 0 for exact, T//2 for fast)."""
    if prefill not in PREFILL_MODES:
        raise InputError(f"prefill={prefill!r} is unknown; choose 'exact' (the recurrence) or 'fast' (one parallel "
                         "pass over a prompt, one eviction, then the recurrence).")
    if prompt is None:
        return T // 2 if prefill == "fast" else 0
    if isinstance(prompt, bool) or not isinstance(prompt, int) or not 0 <= prompt <= T - 1:
        raise InputError(f"prompt={prompt!r} must be an integer in 0..{T - 1} (tokens of each chunk read before "
                         f"scoring starts) for chunks of T={T} tokens.")
    return prompt


def prefix_length(states: int, prefill: str, prompt: int) -> int:
    """L: how many leading tokens of a chunk a policy with budget k = `states` reads exactly as the full model does.

    exact: the first k tokens cause no eviction. fast: the prompt is one parallel pass, evicted once at its end."""
    return max(states, prompt) if prefill == "fast" else states


def smallest_budget(policy: Policy, layers: int) -> int:
    """The smallest budget of any layer: the first layer to evict does so after that many tokens."""
    return min(layer_budgets(policy, layers))


def group_steps(T: int, L: int) -> int:
    """Recurrent steps a batch runs on chunks of T tokens from prefix length L: the last prefix token, then tokens
    L..T-2. (The progress bar counts these; the reference, a few % of the time, is not counted.)"""
    return 0 if L >= T - 1 else T - L


def _score_kind(policy: Policy):
    """Members whose running scores evolve alike over an unevicting prefix (same class and settings but the budget)
    share one prefill; None for members that keep no score."""
    if not policy.keeps_score:
        return None
    settings = {k: v for k, v in vars(policy).items() if k != "states" and not isinstance(v, torch.Tensor)}  # no caches
    key = (type(policy), tuple(sorted(settings.items())))
    try:
        hash(key)
    except TypeError:  # a user's policy holding unhashable settings: its own prefill
        return id(policy)
    return key


def _unevicting(policy: Policy, length: int, layers: int) -> Policy:
    """A copy of `policy` with a budget >= length: it reads a prefix of `length` tokens without evicting. Its score
    update (H2O's accumulated attention) does not depend on the budget, so the prefix state is the member's own.
    A policy with budgets per layer gets a copy of each layer's policy."""
    if type(policy).at_layer is not Policy.at_layer:  # bound once, as the model binds it (no second at_layer)
        return PerLayer([_twin(policy.at_layer(i, layers), length) for i in range(layers)])
    return _twin(policy, length)


def _twin(policy: Policy, length: int) -> Policy:
    twin = copy.copy(policy)
    twin.states = max(policy.states, length)
    return twin


def _prefix_state(model, prefix: torch.Tensor, rows: RowPolicies) -> State:
    """The batch state after the prefix (B, n), during which no row evicts: one parallel prefill shared by every
    member that keeps no score, one per kind of score (H2O accumulates attention), stacked member-major."""
    B, n = prefix.shape
    parts, done = [], {}
    for member in rows.members:
        kind = _score_kind(member)
        if kind not in done:
            twin = _unevicting(member, n + 1, model.cfg.num_hidden_layers)
            done[kind] = model.init_state(B, twin)
            if n:
                model.prefill(prefix, done[kind], twin, mode="exact")
        parts.append(done[kind])
    return State.stack(parts)  # copies, so the parts may repeat


def _run_rows(model, tokens, members: Sequence[Policy], starts: list[int], ref: Reference, progress) -> Scores:
    """Members (any budgets) on all chunks at once: Scores (P, B, T-1) over indices 0..T-2. Member i equals the full
    model below starts[i] (copied from `ref`) and is measured from the recurrence from there on, run layer-major
    in pieces (the logits of a piece, (P*B, piece, V), are measured and dropped before the next)."""
    B, T = tokens.shape
    P = len(members)
    out = ref.copies(P)
    L = min(starts)
    if L >= T - 1:
        return out
    rows = RowPolicies(members, B)
    state = _prefix_state(model, tokens[:, : L - 1], rows)
    vocab = model.cfg.vocab_size
    piece = max(16, min(256, 2**27 // (P * B * vocab)))  # ~512 MB of fp32 logits per piece
    for a in range(L - 1, T - 1, piece):  # the last prefix token first: fast mode's one eviction happens there
        b = min(a + piece, T - 1)
        logits, state = model.prefill(tokens[:, a:b].repeat(P, 1), state, rows, all_logits=True)  # (P*B, n, V)
        logits = logits.cpu()  # measured beside the reference, which is kept in CPU memory
        if a + 1 < b or a >= L:
            keep = slice(max(L - a, 0), None)  # index L-1 predicts token L: still the full model's, from `ref`
            ref.measure(out, logits.view(P, B, b - a, -1)[:, :, keep], tokens, max(a, L))
        progress(b - a)
    for i, start in enumerate(starts):  # a member with a larger budget (or prompt) still equalled full up to there
        out.loss[i, :, L:start], out.agree[i, :, L:start], out.kl[i, :, L:start] = ref.loss[:, L:start], True, 0.0
    return out


@torch.inference_mode()
def score(model, tokens, policies: Sequence[Policy | None], prefill: str = "exact", prompt: int | None = None,
          reference: Reference | None = None, progress: Callable[[int], None] | None = None) -> list[Scores]:
    """Every policy of `policies` (None = full) on the chunks `tokens` (B, T), each chunk from an empty state.

    Returns one Scores per policy, each tensor (B, N) over the scored next tokens (positions max(P,1)..T-1).
    All policies (of one position scheme) run together as one batch of policies x chunks rows, whatever their
    budgets (see RowPolicies)."""
    tokens = _as_batch(tokens)
    T = tokens.shape[1]
    prompt = _check_run(prefill, prompt, T)
    for p in policies:
        if p is not None and not isinstance(p, Policy):
            raise InputError(f"policy must be a msrnn.policies.Policy or None (full), got {type(p).__name__}; "
                             "build one with msrnn.make_policy(name, states).")
    reference = reference or Reference.compute(model, tokens)
    progress = progress or (lambda n: None)
    measured: dict[int, Scores] = {}  # policy index -> Scores (B, T-1) over every logits index
    groups: dict[str, list[int]] = {}  # one batch per position scheme (they cache keys differently)
    for i, p in enumerate(policies):
        if p is None:
            measured[i] = reference.copies(1).part(0)
        else:
            groups.setdefault(p.positions, []).append(i)
    for idx in groups.values():
        members = [policies[i] for i in idx]
        starts = [prefix_length(smallest_budget(m, model.cfg.num_hidden_layers), prefill, prompt) for m in members]
        group = _run_rows(model, tokens, members, starts, reference, progress)
        measured.update({i: group.part(j) for j, i in enumerate(idx)})
    scored = slice(max(prompt, 1) - 1, T - 1)
    return [measured[i].part(Ellipsis, scored) for i in range(len(policies))]


def compare(model, tokens, policy: Policy | None, prefill: str = "exact", prompt: int | None = None) -> Scores:
    """One policy against the full model: Scores with .loss, .agree, .kl per token ((N,) for 1-D tokens, else
    (B, N)) and .ppl, .agreement, .mean_kl."""
    s = score(model, tokens, [policy], prefill, prompt)[0]
    return s.part(0) if torch.as_tensor(tokens).dim() == 1 else s


def perplexity(model, tokens, policy: Policy | None = None, prefill: str = "exact", prompt: int | None = None):
    """Per-token next-token cross-entropy (fp32, nats) of `policy` (None = the full model) on tokens (T,) or (B, T),
    each row one chunk run from an empty state. Returns (N,) or (B, N) for the scored positions max(P,1)..T-1:
    with the default prompt (0 in exact mode) that is positions 1..T-1, N = T-1. PPL = exp(losses.mean())."""
    return compare(model, tokens, policy, prefill, prompt).loss


# --- text -> chunks ------------------------------------------------------------------------------------------------
def pick_chunks(ids: Sequence[int], context: int, chunks: int) -> tuple[torch.Tensor, list[int]]:
    """Cut the token stream into consecutive chunks of `context` tokens (a partial last one is dropped) and take
    `chunks` of them spread evenly over the text (0 = all): chunk i of n is the middle one of the i-th n-th of the
    book, so a short run is not all front matter. Returns tokens (n, context) and the chunk indices."""
    if context < 2:
        raise InputError(f"--context {context}: a chunk needs at least 2 tokens.")
    total = len(ids) // context
    if total == 0:
        raise InputError(f"the text has {len(ids)} tokens, fewer than one chunk of --context {context}; "
                         "give a longer text or a smaller --context.")
    if chunks < 0 or chunks > total:
        raise InputError(f"--chunks {chunks}: the text holds {total} chunks of {context} tokens; give 1..{total} "
                         "(or 0 for all).")
    n = chunks or total
    index = [int((i + 0.5) * total / n) for i in range(n)]
    data = torch.tensor(ids[: total * context], dtype=torch.long).view(total, context)
    return data[index], index


# --- msrnn eval ppl: the grid, resumable ---------------------------------------------------------------------------
RESULTS = "results.jsonl"


def _record(path: Path, record: dict) -> None:
    """Append one finished unit to the results file (flushed: an interrupted run keeps it)."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _load_results(path: Path, settings: dict, resume: bool,
                  key: Callable[[dict], tuple] = lambda u: (u["policy"], _budget_key(u["states"]), u["batch"]),
                  problem: Callable[[dict], str | None] | None = None) -> dict[tuple, dict]:
    """Finished units {key(unit): unit} ({(policy, states, batch): sums} for eval ppl) from a previous run with the
    same settings (--resume), else a fresh file holding the settings."""
    if resume and path.is_file():
        lines = [_parse(line) for line in path.read_text().splitlines()]
        lines = [line for line in lines if line is not None]  # a line cut short by a kill is not a finished unit
        old = lines[0].get("settings") if lines and isinstance(lines[0], dict) else None
        if not isinstance(old, dict):
            raise InputError(f"--resume: {path} does not start with the settings line msrnn writes; it is not a "
                             "results file of `msrnn eval ppl`. Drop --resume (or choose another --out) to start again.")
        diff = [f"{k} {settings[k]!r} (was {old.get(k)!r})" for k in settings if old.get(k) != settings[k]]
        if diff:
            raise InputError(f"--resume: {path} was made with other settings: {'; '.join(diff)}. Rerun with the "
                             "same settings, or drop --resume (or choose another --out) to start again.")
        for i, unit in enumerate(lines[1:], start=2):
            if wrong := (problem or unit_problem)(unit):
                raise InputError(f"--resume: unit {i} of {path} is not one msrnn wrote ({wrong}); delete that line "
                                 "(its cell is then computed again) or drop --resume to start afresh.")
        return {key(u): u for u in lines[1:]}
    if path.is_file():
        print(f"msrnn: starting afresh: replacing {path} (use --resume to continue it)", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings}) + "\n")
    return {}


def unit_problem(u) -> str | None:
    """What is wrong with one unit read back from a results file, if anything: the keys `sums()` writes, with
    counts that are non-negative integers, sums that are finite numbers, and per-chunk lists that add up."""
    def is_int(x, lo=0):
        return isinstance(x, int) and not isinstance(x, bool) and x >= lo

    def is_number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not isinstance(u, dict):
        return f"a JSON {type(u).__name__}, not an object"
    states = u.get("states", 0)
    per_layer = isinstance(states, list) and states and all(is_int(k, 1) for k in states)
    if not isinstance(u.get("policy"), str) or not (states is None or is_int(states, 1) or per_layer) \
            or not is_int(u.get("batch")):
        return "policy, states or batch missing or of the wrong type"
    if not is_int(u.get("tokens"), 1) or not is_int(u.get("agree")) or u["agree"] > u["tokens"] \
            or not all(is_number(u.get(k)) for k in ("loss", "kl")):
        return "tokens, agree, loss or kl missing, negative or not finite"
    chunks = [u.get(k) for k in ("chunk_tokens", "chunk_loss", "chunk_agree", "chunk_kl")]
    if any(c is not None for c in chunks) and (
            not all(isinstance(c, list) and len(c) == len(chunks[0]) and all(map(is_number, c)) for c in chunks)
            or sum(chunks[0]) != u["tokens"]):
        return "its per-chunk lists are missing, of different lengths, or do not add up to its tokens"
    return None


def _parse(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _parse_grid(policies: str, states: str, positions: str | None = None,
                compare: str | None = None) -> tuple[list[str], list[int]]:
    names = [p.strip() for p in re.split(r",(?![^(]*\))", policies) if p.strip()]  # commas outside (...)
    if compare is not None and (compare == "full" or compare not in names):
        raise InputError(f"--compare {compare}: name one of the bounded policies of --policies "
                         f"({', '.join(n for n in names if n != 'full')}), written as there.")
    if not names:
        raise InputError(f"--policies: none given; choose from {', '.join(POLICIES)} or path/to/file.py:ClassName.")
    budgets = parse_budgets(states)
    for name in names:  # a policy file runs here, once everything else has been checked
        policy_class(parse_spec(name)[0])  # a clear error for an unknown name or a bad file:Class, before any run
    for name in names:  # every policy accepts every budget (clear error now, not after an hour)
        for k in budgets:
            make_policy(name, k, positions)
    return list(dict.fromkeys(names)), budgets


def parse_budgets(states: str) -> list:
    """--states of a grid as typed: "64,128" or "64,[96,64,32]" (one budget per layer in brackets, layer 0 first)
    -> the distinct budgets, smallest mean first: ints, or tuples of per-layer budgets (`_budget_key`)."""
    items = [s for s in re.split(r",(?![^\[]*\])", str(states)) if s.strip()]  # commas outside [...]
    try:
        budgets = [_budget_key(parse_states(s)) for s in items]  # 256, or (96, 64, 32): one per layer
    except InputError:
        raise InputError(f"--states {states!r}: give comma-separated integers, e.g. 64,128,256,512, or budgets per "
                         "layer in brackets, layer 0 first, e.g. 64,[96,64,32].") from None
    if not budgets or min(min(k) if isinstance(k, tuple) else k for k in budgets) < 1:
        raise InputError(f"--states {states!r}: give positive budgets, e.g. 64,128,256,512.")
    return sorted(set(budgets), key=lambda k: (_mean(k), str(k)))


def _budget_key(k):
    """A budget as a grid key: an int, None (full), or a tuple of per-layer budgets (a list in JSON)."""
    return tuple(k) if isinstance(k, list) else k


def _mean(k) -> float:
    """The mean budget per layer: where a per-layer budget sits on the x axis (PyramidKV's k is its mean)."""
    return sum(k) / len(k) if isinstance(k, tuple) else k


def budget_label(k) -> str:
    """A budget as the table's column head: 256, or [96,64,32] for one per layer."""
    return "[" + ",".join(map(str, k)) + "]" if isinstance(k, tuple) else str(k)


def check_layers(names: list[str], budgets: list, layers: int, positions: str | None = None) -> None:
    """Budgets per layer of the grid against the model's depth: one clear error before any run."""
    bounded = [name for name in names if name != "full"]
    for k in budgets:
        if isinstance(k, tuple) and bounded:  # PerLayer.at_layer says what is wrong (the count is the policy's)
            layer_budgets(make_policy(bounded[0], list(k), positions), layers)


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


def paired(cells: list[dict], names: list[str], budgets: list[int], against: str, draws: int = 2000,
           seed: int = 0) -> list[dict]:
    """Each policy against `against` at the same budget, over the same chunks: the PPL ratio and the share of
    `against`'s gap to the full model that the policy closes, (PPL_against - PPL) / (PPL_against - PPL_full), each
    with a paired bootstrap 95 % interval (one draw of chunks serves all three PPLs). Per-cell intervals are wide
    because chunks differ (some text is harder for every policy); paired over the same chunks, that shared part
    cancels, which is what tells two policies apart."""
    full = _cell(cells, "full", None)
    rows = []
    for name in names:
        for k in budgets:
            a, b = _cell(cells, name, k), _cell(cells, against, k)
            if name in ("full", against) or not all("chunk_loss" in c for c in (a, b, full)):
                continue
            pick = _chunk_draws(len(a["chunk_loss"]), draws, seed)  # one draw of chunks for all three
            ppl = [_resampled_ppl(c["chunk_loss"], c["chunk_tokens"], pick) for c in (a, b, full)]
            ratio, closed = ppl[0] / ppl[1], (ppl[1] - ppl[0]) / (ppl[1] - ppl[2])
            point = (a["ppl"] / b["ppl"], (b["ppl"] - a["ppl"]) / (b["ppl"] - full["ppl"]))
            rows.append({"policy": name, "states": k, "against": against, "ratio": point[0],
                         "ratio_low": float(ratio.quantile(0.025)), "ratio_high": float(ratio.quantile(0.975)),
                         "gap_closed": point[1], "gap_closed_low": float(closed.nan_to_num().quantile(0.025)),
                         "gap_closed_high": float(closed.nan_to_num().quantile(0.975))})
    return rows


def bootstrap_ppl(chunk_loss: Sequence[float], chunk_tokens: Sequence[int], draws: int = 2000,
                  seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of PPL = exp(sum loss / sum tokens) over chunks: draw as many chunks as
    there are, with replacement, `draws` times (seeded: the same numbers every run). Chunks, not tokens, are the
    unit: tokens of one chunk share its text and are far from independent."""
    ppl = _resampled_ppl(chunk_loss, chunk_tokens, _chunk_draws(len(chunk_loss), draws, seed))
    return float(ppl.quantile(0.025)), float(ppl.quantile(0.975))


def _chunk_draws(chunks: int, draws: int, seed: int) -> torch.Tensor:
    """(draws, chunks) chunk indices drawn with replacement, seeded: the same numbers every run."""
    return torch.randint(0, chunks, (draws, chunks), generator=torch.Generator().manual_seed(seed))


def _resampled_ppl(chunk_loss: Sequence[float], chunk_tokens: Sequence[int], pick: torch.Tensor) -> torch.Tensor:
    """(draws,) PPL of each draw of chunks: exp(sum loss / sum tokens) over the chunks it picked."""
    loss = torch.tensor(chunk_loss, dtype=torch.float64)
    tokens = torch.tensor(chunk_tokens, dtype=torch.float64)
    return (loss[pick].sum(-1) / tokens[pick].sum(-1)).exp()


def _cell(cells: list[dict], name: str, k: int | None) -> dict:
    return next(c for c in cells if c["policy"] == name and c["states"] in (k, None))


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
            (fmt.format(_cell(cells, name, k)[key]) if fmt else f"{100 * _cell(cells, name, k)[key]:.1f}")
            for k in budgets) + " |" for name in names]
        blocks.append(f"## {label}\n\n{head}\n" + "\n".join(rows))
    if all(c.get("ppl_low") is not None for c in cells):
        rows = [f"| {name} | " + " | ".join(
            "{ppl_low:.2f}–{ppl_high:.2f}".format(**_cell(cells, name, k)) for k in budgets) + " |" for name in names]
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
            full = _cell(cells, name, None)
            ax.axhline(full["ppl"], color="black", ls="--", label="full (unbounded)")
            if full.get("ppl_low") is not None:
                ax.axhspan(full["ppl_low"], full["ppl_high"], color="black", alpha=0.06, lw=0)
            continue
        row = [_cell(cells, name, k) for k in budgets]
        x = [_mean(k) for k in budgets]  # a budget per layer sits at its mean
        (line,) = ax.plot(x, [c["ppl"] for c in row], "o-", label=name)
        if all(c.get("ppl_low") is not None for c in row):  # the bootstrap interval over chunks, shaded
            ax.fill_between(x, [c["ppl_low"] for c in row], [c["ppl_high"] for c in row],
                            color=line.get_color(), alpha=0.15, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain_log_axis(ax.yaxis)
    ax.set_xticks([_mean(k) for k in budgets], [budget_label(k) for k in budgets])
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
    prompt = _check_run(args.prefill, args.prompt, args.context)
    compare = getattr(args, "compare", None)
    names, budgets = _parse_grid(args.policies, args.states, args.positions, compare)  # last: it runs policy files
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
        done = _load_results(results, settings, args.resume)
    _barrier(world)
    if rank:  # the file rank 0 has just started or checked
        done = _load_results(results, settings, resume=True)
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
                             lambda unit: _record(results, unit), bar, mine, args.positions)
        except KeyboardInterrupt:
            bar.close()
            print(f"msrnn: interrupted; finished cells are kept in {results}: rerun with --resume to continue.",
                  file=sys.stderr)
            raise
    _barrier(world)
    if rank:
        return
    if world > 1:  # every process appended its units to the one results file
        units = _load_results(results, settings, resume=True)
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


