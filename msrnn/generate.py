"""Generation: run the multi-state RNN on its own output, and the `generate`, `chat` and `info` commands.

    for piece in generate(model, "Once upon a time", tok, policy="tova", states=256):
        print(piece, end="", flush=True)

The loop is the paper's recurrence and nothing more: prefill the prompt into a state, then repeatedly pick a token
from the logits (`sample`) and feed it back with `model.step`. With a bounded policy the state never holds more than
k states per layer, however long the generation or the conversation goes on: that is what makes a bounded
transformer an RNN, and why `msrnn chat` can continue past the model's context length with constant memory.

Batches of prompts of different lengths. msrnn's model has no padding mask: a row's visible states are decided by
their positions alone. So we never pad a prompt. Each prompt is prefilled alone in its own batch-1 state (exactly
what it would see alone, evictions included), and the row states are then stacked into one batch state
(`State.stack`): a shorter row's unused slots get position -1 (EMPTY), which attention masks out and eviction drops
first. Decoding then steps all rows together, and each row gets the tokens it would get alone (greedy), up to
floating-point summation order. One caveat: `dynamic` RoPE scaling depends on the longest position in the call, so
with that (rare) rope type the rows of a batch do see each other's lengths, as in transformers.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterator, Sequence

import torch

from .errors import InputError
from .model import PREFILL_MODES
from .policies import POLICIES, Policy, make_policy
from .report import human_bytes
from .state import State



# --- choosing the next token ----------------------------------------------------------------------------------------
def check_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """Raise InputError for settings `sample` cannot honour (checked once, before any work is done)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise InputError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k must be a positive integer or None, got {top_k!r}.")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise InputError(f"top_p must be in (0, 1] or None, got {top_p!r}.")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V).

    temperature 0 is greedy (argmax; top_k/top_p are then irrelevant). Otherwise the logits are divided by the
    temperature, cut to the top_k most likely tokens and to the smallest set whose probability reaches top_p
    (nucleus sampling; the most likely token always survives), and one token is drawn with `generator`.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # (B, V) mass of the more likely tokens
        ordered = ordered.masked_fill(before >= top_p, float("-inf"))  # already reached top_p without this one
        logits = logits.scatter(-1, order, ordered)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]  # (B,)


def make_sampler(temperature: float, top_k: int | None, top_p: float | None, seed: int | None,
                 device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """logits (B, V) -> ids (B,), with its own random generator when a seed is given (reproducible runs)."""
    check_sampling(temperature, top_k, top_p)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InputError(f"seed must be an integer or None, got {seed!r}.")
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    return lambda logits: sample(logits, temperature, top_k, top_p, generator)


def check_penalty(penalty) -> None:
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty > 0:
        raise InputError(f"repetition_penalty must be a number > 0 (1 = none, 1.1-1.3 typical), got {penalty!r}.")


def penalize_repeats(pick: Callable[[torch.Tensor], torch.Tensor], rows: list[list[int]], vocab: int,
                     penalty: float, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """`pick` with CTRL's repetition penalty (Keskar et al. 2019, as transformers applies it): the logit of every
    token already in a row's prompt or answer is divided by `penalty` if positive, multiplied by it if negative."""
    check_penalty(penalty)
    seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)  # (B, V)
    for i, row in enumerate(rows):
        seen[i, row] = True

    def pick_penalized(logits: torch.Tensor) -> torch.Tensor:
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        tokens = pick(logits)  # (B,)
        seen[torch.arange(len(tokens), device=seen.device), tokens] = True
        return tokens

    return pick_penalized


def resolve_policy(policy: Policy | str | None, states: int | None = None,
                   positions: str | None = None) -> Policy | None:
    """A policy name plus a budget (and a position scheme), a Policy object, or None (unbounded) -> Policy | None."""
    if policy is None:
        if states is not None:
            raise InputError(f"states={states} was given without a policy; name one, e.g. policy='tova' "
                             "(--policy tova), or drop states for the unbounded transformer.")
        return None
    if isinstance(policy, str):
        return make_policy(policy, states, positions)
    if isinstance(policy, Policy):
        if states is not None and states != policy.states:
            raise InputError(f"states={states} contradicts the policy object's own budget ({policy!r}); drop states.")
        return policy
    raise InputError(f"policy must be a name ({', '.join(POLICIES)}), a msrnn.policies.Policy or None; "
                     f"got {type(policy).__name__}.")


def eos_ids(model, tokenizer=None) -> list[int]:
    """Every id that ends a generation: the tokenizer's EOS ids and the model config's (they may differ)."""
    ids = list(getattr(tokenizer, "eos_ids", ()) or ()) + list(model.cfg.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids))


# --- prompts --------------------------------------------------------------------------------------------------------
def encode_prompts(prompt, tokenizer=None, chat: bool = False) -> tuple[list[list[int]], bool]:
    """(one list of ids per row, batched?) from a string, a list of ids, or a list of strings (or of id lists)."""
    if isinstance(prompt, str):
        return [_encode(prompt, tokenizer, chat)], False
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist()
    if isinstance(prompt, Sequence) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        if chat:
            raise InputError("chat=True needs the prompt as text (the chat template formats text); got token ids.")
        return [list(prompt)], False
    if isinstance(prompt, Sequence) and prompt and all(isinstance(p, (str, list, tuple)) for p in prompt):
        rows = [_encode(p, tokenizer, chat) if isinstance(p, str) else encode_prompts(list(p), tokenizer, chat)[0][0]
                for p in prompt]
        return rows, True
    raise InputError("prompt must be a string, a non-empty list of token ids, or a non-empty list of strings "
                     f"(a batch); got {type(prompt).__name__} {str(prompt)[:40]!r}.")


def _encode(text: str, tokenizer, chat: bool) -> list[int]:
    if tokenizer is None:
        raise InputError("a text prompt needs a tokenizer: pass tokenizer=... (msrnn.load returns one) "
                         "or give the prompt as token ids.")
    if chat:  # the template writes BOS itself where the model wants one (as transformers' tokenize=True)
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    ids = tokenizer.encode(text, add_bos=False if chat else None)
    if not ids:
        raise InputError("the prompt is empty (no tokens): give some text to continue.")
    return ids


# --- batch states ---------------------------------------------------------------------------------------------------
def prefill_rows(model, rows: list[list[int]], policy: Policy | None, mode: str = "exact", progress=None):
    """Prefill each prompt alone (no padding, so each row sees exactly its own tokens), then stack the row states.

    Returns logits of each prompt's last token (B, V) and the batch state."""
    device = model.embed.weight.device
    results = [model.prefill(torch.tensor([row], device=device), None, policy, mode, progress=progress)
               for row in rows]
    logits = torch.cat([lg for lg, _ in results])  # (B, V)
    state = results[0][1] if len(results) == 1 else State.stack([s for _, s in results])
    return logits, state


# --- the decoding loop ----------------------------------------------------------------------------------------------
def decode_tokens(model, logits: torch.Tensor, state: State, policy: Policy | None, max_new_tokens: int,
                  pick: Callable[[torch.Tensor], torch.Tensor], stop_ids: Sequence[int] = (),
                  feed_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The recurrence run on its own output. Yields (tokens (B,), new (B,) bool) per step: `new` marks the rows
    whose token belongs to their answer (not an id of `stop_ids`, row not finished before).

    A finished row keeps being fed its own picks (a batch steps together) but nothing more of it is reported. The
    last token picked is fed to the state only with `feed_last` (for a caller that will continue the state);
    otherwise the state ends having seen every token but the last one.
    """
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)  # (B,)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=logits.device)
    for i in range(max_new_tokens):
        tokens = pick(logits)  # (B,)
        ended = torch.isin(tokens, stop)  # (B,)
        yield tokens, ~done & ~ended
        done |= ended
        if bool(done.all()) or (i == max_new_tokens - 1 and not feed_last):
            return
        logits, state = model.step(tokens, state, policy)


def check_generation(max_new_tokens, prefill: str) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")
    if prefill not in PREFILL_MODES:
        raise InputError(f"prefill={prefill!r} is unknown; choose 'exact' (the recurrence) or 'fast' (one parallel "
                         "pass, then one eviction).")


def generate(model, prompt, tokenizer=None, policy: Policy | str | None = None, states: int | None = None,
             max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, prefill: str = "exact", stop_at_eos: bool = True,
             chat: bool = False, state: State | None = None, progress: bool = False, repetition_penalty: float = 1.0,
             stop: Sequence[str] = (), text: bool = True) -> Iterator:
    """Stream the continuation of `prompt`, piece by piece as tokens arrive.

    prompt: a string (encoded with `tokenizer`; with chat=True first wrapped in the tokenizer's chat template), a
    list of token ids, or a list of strings / id lists (a batch of prompts of any lengths).
    policy: a name with `states` (policy="tova", states=256), a Policy object, or None (unbounded transformer).
    temperature 0 is greedy; `seed` makes sampling reproducible. Stops at an EOS id (the tokenizer's and the model
    config's) unless stop_at_eos=False; the EOS token itself is not yielded.
    state: continue this single-row state (updated in place) instead of starting a new one; afterwards it has seen
    the prompt and every yielded token, so the next call can continue the same conversation.
    progress: show a progress bar on stderr while the prompt is read, if that takes more than a second.
    repetition_penalty: > 1 discourages tokens already in the prompt or the answer (see `penalize_repeats`).
    stop: strings that end a row's answer; the answer is cut before the first of them (needs a tokenizer). A state
    passed in has then seen the tokens up to the one that completed the stop string.

    Yields text pieces (str) for one prompt, (row, piece) pairs for a batch; token ids instead of text when no
    tokenizer is given, or with text=False (the tokenizer then still encodes the prompt and gives its EOS ids). Arguments are checked when called, before the first token is asked for.
    """
    policy = resolve_policy(policy, states)
    check_generation(max_new_tokens, prefill)
    rows, batched = encode_prompts(prompt, tokenizer, chat)
    vocab = model.cfg.vocab_size
    if bad := [i for row in rows for i in row if not 0 <= i < vocab]:
        raise InputError(f"token id {bad[0]} is out of range for a vocabulary of {vocab}; "
                         "was the prompt encoded with this model's tokenizer?")
    if state is not None and len(rows) != 1:
        raise InputError("state= continues a single prompt; give one prompt, or no state for a batch.")
    pick = make_sampler(temperature, top_k, top_p, seed, model.embed.weight.device)
    if repetition_penalty != 1:
        pick = penalize_repeats(pick, rows, vocab, repetition_penalty, model.embed.weight.device)
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
        raise InputError(f"stop must be a list of non-empty strings, got {stop!r}.")
    if stop and tokenizer is None:
        raise InputError("stop strings need a tokenizer (they are matched in the text); pass tokenizer=...")
    stop_ids = eos_ids(model, tokenizer) if stop_at_eos else []
    tokens = _run(model, rows, policy, prefill, max_new_tokens, pick, stop_ids, state, progress)
    if not text and stop:
        raise InputError("stop strings are matched in the text: give text=True with stop=..., or match them yourself.")
    return text_pieces(tokens, tokenizer if text else None, len(rows), batched, tuple(stop))


def _run(model, rows, policy, prefill, max_new_tokens, pick, stop, state, progress) -> Iterator[tuple[int, int]]:
    """(row, token id) for every answer token, in order."""
    from tqdm import tqdm

    continuing = state is not None  # the caller keeps the state: it must see the prompt and the last token too
    if not continuing and max_new_tokens == 0:
        return
    with tqdm(total=sum(map(len, rows)), desc="prompt", unit="tok", file=sys.stderr, delay=1.0, leave=False,
              disable=not progress) as bar:
        if continuing:
            logits, state = model.prefill(torch.tensor(rows, device=model.embed.weight.device), state, policy,
                                          prefill, progress=bar.update)
        else:
            logits, state = prefill_rows(model, rows, policy, prefill, progress=bar.update)
    for tokens, new in decode_tokens(model, logits, state, policy, max_new_tokens, pick, stop, continuing):
        for row in new.nonzero()[:, 0].tolist():
            yield row, int(tokens[row])


def text_pieces(tokens: Iterator[tuple[int, int]], tokenizer, batch: int, batched: bool, stop: tuple = ()) -> Iterator:
    """Turn (row, id) into text pieces with one incremental decoder per row (a character may span tokens). With
    stop strings, text that could be the start of one is held back until it is known not to be; a row ends at the
    first stop string, and generation ends when every row has."""
    decoders = [tokenizer.stream_decoder() for _ in range(batch)] if tokenizer is not None else None
    held, ended = [""] * batch, [False] * batch
    for row, token in tokens:
        if ended[row]:
            continue
        piece = decoders[row].push(token) if decoders else token
        if stop and piece != "":
            piece, held[row], ended[row] = _cut_at_stop(held[row] + piece, stop)
        if piece != "":
            yield (row, piece) if batched else piece
        if all(ended):
            return  # closes the token generator: nothing more is computed
    for row, decoder in enumerate(decoders or []):
        if ended[row]:
            continue
        piece = held[row] + decoder.flush()
        if stop:
            piece = _cut_at_stop(piece, stop, final=True)[0]
        if piece:
            yield (row, piece) if batched else piece


def _cut_at_stop(text: str, stop: tuple, final: bool = False) -> tuple[str, str, bool]:
    """(text safe to show, text held back, ended?) for the text a row has not shown yet."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    if found:
        return text[: min(found)], "", True
    if final:
        return text, "", False
    keep = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)  # a stop's start
    return text[: len(text) - keep], text[len(text) - keep :], False


def generate_text(model, prompt, tokenizer=None, **kwargs) -> str | list[str]:
    """`generate` collected: the answer text, or a list of them for a batch of prompts."""
    if tokenizer is None:
        raise InputError("generate_text needs a tokenizer to return text; use generate() to get token ids.")
    rows, batched = encode_prompts(prompt, tokenizer, kwargs.pop("chat", False))
    texts = [""] * len(rows)
    for item in generate(model, rows if batched else rows[0], tokenizer, **kwargs):
        row, piece = item if batched else (0, item)
        texts[row] += piece
    return texts if batched else texts[0]


# --- the command ---------------------------------------------------------------------------------------------------
def sampling_settings(args) -> dict:
    """generate()'s keyword arguments from the command line's options."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, prefill=args.prefill, repetition_penalty=args.repetition_penalty,
                stop=tuple(args.stop or ()))


def check_settings(args) -> None:
    """The sampling options, checked before a policy file runs or the model loads (generate() checks them too)."""
    check_generation(args.max_new_tokens, args.prefill)
    check_sampling(args.temperature, args.top_k, args.top_p)
    check_penalty(args.repetition_penalty)


def run_generate(args, load) -> None:
    """`msrnn generate`: stream the continuation of args.prompt; `load()` gives (model, tokenizer)."""
    check_settings(args)
    policy = resolve_policy(args.policy, args.states, args.positions)  # last: it may run a policy file
    model, tokenizer = load()
    [prompt], _ = encode_prompts(args.prompt, tokenizer, args.chat)
    state = model.init_state(1, policy) if args.verbose else None  # our own state, to report on it afterwards
    times = [time.perf_counter()]
    write_stream(generate(model, prompt, tokenizer, policy=policy, state=state, progress=sys.stderr.isatty(),
                    **sampling_settings(args)), times)
    if args.verbose:
        n = int(state.next_pos[0]) - len(prompt)  # the state has seen the prompt and every new token
        timing = f"; first piece after {times[1] - times[0]:.1f} s" if len(times) > 1 else ""
        timing += f", then {(n - 1) / (times[-1] - times[1]):.1f} tokens/s" if len(times) > 2 else ""
        print(f"[{len(prompt)} prompt tokens, {n} new{timing}; {describe_state(state, policy)}]", file=sys.stderr)


def write_stream(pieces: Iterator[str], times: list[float] | None = None) -> None:
    """Stream text to stdout as it comes, flushing each piece, and end the line; appends each piece's time to
    `times`. Says so on stderr when there was nothing to write (the model ended its answer at once)."""
    written = False
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        written = True
        if times is not None:
            times.append(time.perf_counter())
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not written:
        print("msrnn: the answer is empty: the first token picked ends the text (an end-of-sequence id). A small "
              "--states can cause this; try a larger budget or another --policy.", file=sys.stderr)


def describe_state(state: State, policy: Policy | None) -> str:
    return (f"state: {state.size} states/layer, {human_bytes(state.nbytes())}, {int(state.next_pos[0])} tokens seen, "
            f"policy {policy!r}")
