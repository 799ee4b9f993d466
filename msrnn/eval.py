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

`msrnn eval ppl` (msrnn/ppl.py) runs the grid policies x budgets on this engine and writes the paper's Table 3 layout
(markdown, CSV, JSON, PNG); `msrnn eval stream` (msrnn/stream.py) runs one long stream far past the trained context
and reports PPL and memory per window.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .batch import RowPolicies
from .errors import InputError
from .model import PREFILL_MODES
from .policies import PerLayer, Policy, layer_budgets
from .state import State


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


def check_run(prefill: str, prompt: int | None, T: int) -> int:
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
    L..T-2. (The progress bar counts these, and the reference's T-1 tokens: msrnn/ppl.py::grid_steps.)"""
    return 0 if L >= T - 1 else T - L


def _score_kind(policy: Policy):
    """Members whose running scores evolve alike over an unevicting prefix (same class and settings but the budget)
    share one prefill; None for members that keep no score."""
    if policy.needs_surprise:  # the prefix must record its surprise (msrnn/surprise.py), with the member's span
        return ("surprise", getattr(policy, "span", None), policy.keeps_score and id(policy))
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
    twin.states, twin.heads = max(policy.states, length), None  # every kv head keeps the whole prefix
    return twin


def prefix_state(model, prefix: torch.Tensor, rows: RowPolicies) -> State:
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
    state = prefix_state(model, tokens[:, : L - 1], rows)
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
    prompt = check_run(prefill, prompt, T)
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
