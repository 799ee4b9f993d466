"""`msrnn chat`: a conversation kept in one bounded multi-state, past the model's context length.

    session = ChatSession(model, tok, make_policy("tova", 512))
    for piece in session.say("Hello!"):
        print(piece, end="")
"""
from __future__ import annotations

import os
import sys
from typing import Iterator

from .generate import (check_generation, check_sampling, check_settings, describe_state, generate, resolve_policy,
                       sampling_settings, write_stream)
from .policies import Policy

CHAT_DEFAULT_POLICY, CHAT_DEFAULT_STATES = "tova", 512


def run_chat(args, load) -> None:
    """`msrnn chat`: a REPL on stdin; `load()` gives (model, tokenizer)."""
    if args.policy is None:  # a chat should outlive the context length: bounded unless asked otherwise
        args.policy, args.states = CHAT_DEFAULT_POLICY, args.states or CHAT_DEFAULT_STATES
        print(f"msrnn: policy {args.policy} with {args.states} states (change with --policy/--states; "
              "--policy full is the unbounded transformer)", file=sys.stderr)
    check_settings(args)
    policy = resolve_policy(args.policy, args.states, args.positions)  # last: it may run a policy file
    model, tokenizer = load()
    session = ChatSession(model, tokenizer, policy, system=args.system, **sampling_settings(args))
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return
        if not line.strip():
            continue
        write_stream(session.say(line.rstrip("\n")))
        if args.verbose:
            print(f"[{describe_state(session.state, policy)}]", file=sys.stderr)


class ChatSession:
    """A conversation kept in ONE multi-state. Each turn renders the whole conversation with the chat template and
    feeds only the text the state has not seen yet (the part after the longest common prefix with what was fed), so
    the cost of a turn is its own length, and with a bounded policy the memory stays k states per layer however
    long the chat goes on."""

    def __init__(self, model, tokenizer, policy: Policy | None, system: str | None = None, **sampling):
        check_generation(sampling.get("max_new_tokens", 0), sampling.get("prefill", "exact"))
        check_sampling(sampling.get("temperature", 0.0), sampling.get("top_k"), sampling.get("top_p"))
        self.model, self.tokenizer, self.policy, self.sampling = model, tokenizer, policy, sampling
        self.messages = [{"role": "system", "content": system}] if system else []
        self.state = model.init_state(1, policy)
        self.fed = ""  # the conversation text the state has seen

    def say(self, text: str) -> Iterator[str]:
        """Stream the answer to the user's `text`; the conversation (and the state) then include both."""
        self.messages.append({"role": "user", "content": text})
        full = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
        seen = len(os.path.commonprefix([full, self.fed]))
        ids = self.tokenizer.encode(full[seen:], add_bos=False)  # the chat template writes BOS where wanted
        answer = []
        for piece in generate(self.model, ids, self.tokenizer, policy=self.policy, state=self.state,
                              progress=sys.stderr.isatty(), **self.sampling):
            answer.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(answer)})
        self.fed = full + "".join(answer)
