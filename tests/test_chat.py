"""`msrnn chat` as a person uses it: in a terminal (a pseudo-terminal driven by pexpect), with line editing and
history (readline), /help, Ctrl-C that stops an answer and keeps the conversation, Ctrl-D that ends it cleanly; and
ChatSession's state after an answer stopped half-way."""
import io
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

import msrnn
from msrnn.chat import ChatSession
from msrnn.cli import main
from msrnn.policies import make_policy
from test_generate import tiny, tiny_dir  # noqa: F401 (fixtures: a tiny model with a word-level chat tokenizer)

pexpect = pytest.importorskip("pexpect")
ROOT = Path(__file__).resolve().parents[1]
SLOW_POLICY = """import time
from msrnn.policies import Window

class Slow(Window):
    name = "slow"

    def priority(self, attn, pos, score):
        time.sleep(0.05)  # 0.1 s a token on the 2-layer model: an answer long enough to interrupt
        return super().priority(attn, pos, score)
"""


def spawn(*args, timeout=60):  # a loaded 2-core machine starts python + torch slowly
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TERM": "xterm", "COLUMNS": "200"}
    env.pop("PYTEST_XDIST_WORKER", None)
    # SIGINT back to its default in the child: a runner started in the background ignores it, the child would inherit
    # that, and Python then never turns Ctrl-C at the prompt into KeyboardInterrupt
    return pexpect.spawn(sys.executable, ["-m", "msrnn", "chat", *args], cwd=str(ROOT), env=env, timeout=timeout,
                         encoding="utf-8", dimensions=(40, 200),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_chat_in_a_terminal_edits_lines_keeps_history_and_says_how_to_quit(tiny_dir):
    child = spawn("--model", str(tiny_dir), "--max-new-tokens", "3", "--policy", "window", "--states", "8")
    child.expect("/help lists the commands; /quit or Ctrl-D ends the chat; Ctrl-C stops an answer")
    child.expect("> ")
    child.send("/hep\x1b[Dl\r")  # a typo fixed with the left arrow: readline edits the line, /help runs
    child.expect("/reset +start a new conversation")
    child.expect("> ")
    child.send("\x1b[A\r")  # up arrow: the last line again
    child.expect("/reset +start a new conversation")
    child.expect("> ")
    child.send("/nope\r")  # an unknown command is not sent to the model
    child.expect("unknown command /nope; /help lists the commands")
    child.expect("> ")
    child.send("hello world\r")
    child.expect("> ")  # the answer, then the next prompt
    child.sendeof()  # Ctrl-D on an empty line: the chat ends on a line of its own
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert child.before.startswith("\r\n") or child.before.startswith("\n"), repr(child.before)


def test_ctrl_c_stops_the_answer_and_keeps_the_conversation(tiny_dir, tmp_path):
    (tmp_path / "slow.py").write_text(SLOW_POLICY)
    child = spawn("--model", str(tiny_dir), "--max-new-tokens", "200", "--policy", f"{tmp_path / 'slow.py'}:Slow",
                  "--states", "4")
    child.expect("> ")
    child.send("the cat sat\r")
    child.expect(r"\w")  # the answer has started
    child.sendintr()  # Ctrl-C: stops this answer, not the chat
    child.expect(r"\[stopped: the answer so far stays in the conversation\]")
    child.expect("> ")
    child.send("/state\r")
    child.expect(r"2 messages")  # the user's and the (partial) answer
    child.expect("> ")
    child.sendintr()  # Ctrl-C at the prompt: a fresh prompt, the chat goes on
    child.expect("> ")
    assert child.isalive()
    child.send("/quit\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_piped_chat_runs_commands_and_not_sends_them_to_the_model(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("/help\nhello world\n/state\n//the cat\n/quit\n"))
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2  # two answers: "hello world" and "/the cat"
    assert "/reset" in captured.err and "2 messages" in captured.err


def test_a_stopped_answer_leaves_the_state_having_seen_exactly_the_conversation(tiny):
    """Stopped after its third piece, the answer stays in the conversation, and the state has seen exactly the
    rendered conversation's tokens: the token whose text was shown last is fed too (generation had not fed it
    yet), so the next turn continues as if the answer had ended there."""
    model, tok = tiny
    session = ChatSession(model, tok, make_policy("tova", 64), max_new_tokens=20)
    pieces = []
    for piece in session.say("the cat sat", stopped=lambda: len(pieces) >= 3):
        pieces.append(piece)
    assert len(pieces) == 3 and session.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
    assert int(session.state.next_pos[0]) == len(tok.encode(session.fed, add_bos=False))
    rest = "".join(session.say("hello"))  # the next turn runs on
    assert int(session.state.next_pos[0]) == len(tok.encode(session.fed, add_bos=False)) and rest is not None
