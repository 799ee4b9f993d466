"""Surprise: how badly the model predicted each token it read, kept with every state it holds.

A needle ("The secret number is 48213.") dropped into a novel is what a bounded state should keep and what every
attention-ranked policy drops: nothing attends to it until the question, which comes after the eviction. What
marks it while it is read is that the model did not see it coming: its first words have a surprisal
-log p(x_t | x_<t) among the highest of the text (" The", " secret" or " number": 13-17 nats, among the ~10 most
surprising of 2,048 tokens in docs/results/needle/surprise-2048/probe.txt). The number itself is not surprising
(2-4 nats a digit), but it follows within a few tokens. So the quantity kept per state is the surprise of its
*episode* (EM-LLM, Fountas et al. 2024, arXiv 2407.09450, cuts a stream into events where surprise peaks):

    s_t = -log p(x_t | x_<t)                       the model's own, under the bounded state (s_0 = 0)
    e_t = max(s_{t-span+1}, ..., s_t)              the largest surprise within `span` tokens up to t

and a policy that `needs_surprise` (msrnn.policies.Surprise) is given e per held state. The logits that give s_t
come out of the step *before* x_t, and a layer-major chunk (attention.scan) has them only after the whole chunk: so
e of a state is written after the call that fed it (+inf until then), and a policy that reads it keeps its newest
`recent` states regardless, while prefill feeds at most `recent` tokens per chunk. Stepping and the chunked scan
then decide alike (tests/test_surprise.py holds both to msrnn/reference.py, which knows e_t at once).

The state carries what the next call needs: the last logits (B, vocab) and the last span - 1 surprisals
(B, span - 1).
"""
from __future__ import annotations

import torch

from .errors import InputError
from .state import EMPTY, State

SUB = 64  # tokens per piece when a chunk's logits are scored: (B, 64, vocab) fp32 at a time, not (B, T, vocab)


def leaves(policy) -> list:
    """The plain policies inside a composite one (PerLayer, RowPolicies: members; PerHead: inner)."""
    if hasattr(policy, "members"):
        return [leaf for m in policy.members for leaf in leaves(m)]
    if hasattr(policy, "inner"):
        return leaves(policy.inner)
    return [policy]


def settings(policy) -> tuple[int, int] | None:
    """(span, recent) of the policies that need surprise in `policy`, or None if none does. Rows of one batch share
    one span (the state keeps one history of surprisals per row); the smallest `recent` bounds the chunks."""
    if policy is None or not getattr(policy, "needs_surprise", False):
        return None
    found = [p for p in leaves(policy) if p.needs_surprise]
    spans = {p.span for p in found}
    if len(spans) != 1:
        raise InputError(f"policies that read surprise with different spans {sorted(spans)} cannot share a batch; "
                         "give them one span, or run them in separate batches.")
    return spans.pop(), min(p.recent for p in found)


def check(policy, mode: str) -> tuple[int, int] | None:
    """settings(policy), once the ways of running a surprise-reading policy that cannot keep its promise are ruled
    out (its position schemes, the prefill `mode`): one InputError each."""
    reads = settings(policy)
    if reads is None:
        return None
    scheme = policy.positions
    if "rebase" in ((scheme,) if isinstance(scheme, str) else scheme):
        raise InputError("a policy that reads surprise cannot run with positions='rebase', in its rows or in other "
                         "rows of its batch (a rebase renumbers the states while their surprise is matched by "
                         "position); use absolute, shift or loglog, or run the rebase rows in a batch of their own.")
    if mode == "fast":
        raise InputError("a policy that reads surprise needs the model's predictions token by token, which a fast "
                         "prefill (one eviction after a parallel pass) does not make; use mode='exact' "
                         "(--prefill exact).")
    return reads


@torch.no_grad()
def record(state: State, tokens: torch.Tensor, hidden: torch.Tensor, logits_of, span: int, last=None) -> None:
    """After a call fed tokens (B, T) and left the final hidden states (B, T, d): the surprise of each of the T
    tokens, e_t, written into every layer's states at their positions; the state keeps the last logits and the last
    span - 1 surprisals. logits_of: hidden (B, t, d) -> logits (B, t, vocab) fp32; last: the last token's logits
    (B, vocab), if the caller has them already (a step returns them)."""
    B, T = tokens.shape
    first = state.next_pos - T  # (B,) the position of the call's first token
    prev = state.last_logits  # (B, vocab) the prediction of the first token, if a call before this one made it
    s = torch.zeros(B, T, device=tokens.device)  # (B, T) surprisal of each token; s_0 = 0 (nothing predicted it)
    if prev is not None:
        s[:, 0] = (torch.logsumexp(prev, -1) - prev.gather(-1, tokens[:, :1])[:, 0]).nan_to_num(0.0)  # NaN: a row
        # stacked from a state that had no prediction (State.stack)
    for a in range(0, T - 1, SUB):  # the call's own logits predict its next tokens: t -> t + 1
        b = min(a + SUB, T - 1)
        lg = logits_of(hidden[:, a:b])  # (B, b - a, vocab)
        s[:, a + 1 : b + 1] = torch.logsumexp(lg, -1) - lg.gather(-1, tokens[:, a + 1 : b + 1, None])[..., 0]
    # (B, vocab): the prediction of the next call's first token
    state.last_logits = last if last is not None else logits_of(hidden[:, -1])
    tail = state.surprise_tail  # (B, span - 1) the surprisals before this call (0 where the stream had none)
    if tail is None or tail.shape[1] != span - 1:
        tail = torch.zeros(B, span - 1, device=s.device)
    history = torch.cat([tail, s], dim=1)  # (B, span - 1 + T)
    episode = history.unfold(1, span, 1).amax(-1)  # (B, T) e_t = max of the span surprisals up to t
    state.surprise_tail = history[:, history.shape[1] - (span - 1):].clone()  # (B, span - 1)
    for layer in state.layers:
        n = layer.size
        pos = layer.pos[:, :, :n]  # (B, Hkv, n)
        new = (pos >= first[:, None, None]) & (pos != EMPTY)  # (B, Hkv, n) the states this call fed
        at = (pos - first[:, None, None]).clamp(0, T - 1).flatten(1)  # (B, Hkv*n) index into the call's tokens
        got = episode.gather(1, at).view_as(pos)  # (B, Hkv, n)
        buf = layer.surprises()[:, :, :n]  # (B, Hkv, n) a view
        buf.copy_(torch.where(new, got, buf))
