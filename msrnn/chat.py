"""`msrnn chat`: a conversation kept in one bounded multi-state, past the model's context length.

    session = ChatSession(model, tok, make_policy("tova", 512))
    for piece in session.say("Hello!"):
        print(piece, end="")
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, Iterator

import torch

from .generate import (check_generation, check_sampling, check_settings, describe_state, generate, resolve_policy,
                       sampling_settings, text_pieces, write_stream)
from .policies import Policy

CHAT_DEFAULT_POLICY, CHAT_DEFAULT_STATES = "tova", 512
PROMPT = "> "
HELP = """commands:
  /help    this list
  /state   the state's size, the tokens it has seen and the conversation's messages
  /reset   start a new conversation (an empty state)
  /quit    end the chat (also /exit, or Ctrl-D on an empty line)
keys: Ctrl-C stops the answer being written (the part written so far stays in the conversation); the arrow keys
edit the line and recall earlier ones. A line that starts with // sends a message that starts with /."""


def run_chat(args, load) -> None:
    """`msrnn chat`: a REPL on stdin (line editing and history with readline in a terminal); `load()` gives
    (model, tokenizer)."""
    if args.policy is None:  # a chat should outlive the context length: bounded unless asked otherwise
        args.policy, args.states = CHAT_DEFAULT_POLICY, args.states or CHAT_DEFAULT_STATES
        print(f"msrnn: policy {args.policy} with {args.states} states (change with --policy/--states; "
              "--policy full is the unbounded transformer)", file=sys.stderr)
    check_settings(args)
    policy = resolve_policy(args.policy, args.states, args.positions)  # last: it may run a policy file
    model, tokenizer = load()

    def new_session():
        return ChatSession(model, tokenizer, policy, system=args.system, **sampling_settings(args))

    session = new_session()
    interactive = sys.stdin.isatty()
    if interactive:
        print("msrnn chat: type a message and press Enter. /help lists the commands; /quit or Ctrl-D ends the chat; "
              "Ctrl-C stops an answer.", file=sys.stderr)
    read = line_reader(interactive)
    while (line := read()) is not None:
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            command = text.split()[0]
            if command in ("/quit", "/exit"):
                return
            if command == "/help":
                print(HELP, file=sys.stderr)
            elif command == "/state":
                print(f"[{describe_state(session.state, policy)}; {len(session.messages)} messages]", file=sys.stderr)
            elif command == "/reset":
                session = new_session()
                print("[a new conversation]", file=sys.stderr)
            else:
                print(f"msrnn: unknown command {command}; /help lists the commands (start a message with // to send "
                      "one that begins with /).", file=sys.stderr)
            continue
        if text.startswith("//"):
            text = text[1:]
        stopped = answer(session, text)
        if stopped:
            print("[stopped: the answer so far stays in the conversation]", file=sys.stderr)
        if args.verbose:
            print(f"[{describe_state(session.state, policy)}]", file=sys.stderr)


def line_reader(interactive: bool) -> Callable[[], str | None]:
    """A function that returns the next line typed, or None at the end of input. In a terminal: readline's line
    editing and history (the arrow keys), the prompt; Ctrl-C on the prompt gives a fresh prompt, Ctrl-D on an empty
    line ends the chat with a newline (the shell's prompt then starts on its own line). Piped: plain lines."""
    if not interactive:
        return lambda: sys.stdin.readline() or None
    try:
        import readline  # noqa: F401 -- importing it gives input() line editing and an in-session history
    except ImportError:  # a Python built without it (Windows): input() still works, without the arrow keys
        pass

    def read() -> str | None:
        while True:
            try:
                return input(PROMPT)
            except EOFError:
                print(flush=True)
                return None
            except KeyboardInterrupt:  # on the prompt: drop the line typed so far, as a shell does
                print(flush=True)

    return read


def answer(session: "ChatSession", text: str) -> bool:
    """Stream the answer to `text` to stdout; Ctrl-C (SIGINT) stops it after the token being written, leaving the
    state as if the answer had ended there. Returns whether it was stopped."""
    flag = threading.Event()
    main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread only
    previous = signal.signal(signal.SIGINT, lambda signum, frame: flag.set()) if main else None
    try:
        write_stream(session.say(text, stopped=flag.is_set))
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    return flag.is_set()


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

    def say(self, text: str, stopped: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """Stream the answer to the user's `text`; the conversation (and the state) then include both. `stopped()`
        is asked after each piece: True ends the answer there (Ctrl-C in `msrnn chat`), as does closing this
        generator; the answer so far then stays in the conversation, and the state has seen exactly its tokens."""
        self.messages.append({"role": "user", "content": text})
        full = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
        seen = len(os.path.commonprefix([full, self.fed]))
        ids = self.tokenizer.encode(full[seen:], add_bos=False)  # the chat template writes BOS where wanted
        sampling = {k: v for k, v in self.sampling.items() if k != "stop"}  # stop strings: matched below
        answer_ids, pending = [], []  # pending: the token just handed out, not yet fed to the state

        def tokens():
            for token in generate(self.model, ids, self.tokenizer, policy=self.policy, state=self.state,
                                  progress=sys.stderr.isatty(), text=False, **sampling):
                answer_ids.append(token)
                pending.append(token)
                yield 0, token
                pending.clear()  # resumed: generation feeds it before the next token

        answer, complete = [], False
        pieces = text_pieces(tokens(), self.tokenizer, 1, False, tuple(self.sampling.get("stop", ())))
        try:
            for piece in pieces:
                answer.append(piece)
                yield piece
                if stopped():
                    break
            else:
                complete = True
        finally:
            pieces.close()
            if complete:
                text = "".join(answer)
            else:  # stopped half-way: feed the token whose text was shown, so the state sees what `fed` says
                if pending:
                    self.model.step(torch.tensor(pending[-1:], device=self.model.embed.weight.device), self.state,
                                    self.policy)
                text = self.tokenizer.decode(answer_ids)
            self.messages.append({"role": "assistant", "content": text})
            self.fed = full + text
