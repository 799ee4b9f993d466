"""msrnn.tasks and `msrnn eval needle|recall` (msrnn/qa.py): the tasks are pure functions of their seed, the
scorer is tested on its own, the batched answering (cells x trials in one state, shared prefix, a fork per query)
equals answering each prompt alone with plain generation, an unbounded budget gives the full model's answers, and
the commands write their tables, figures and results and resume. On a tiny random Llama with a character-level
tokenizer and a chat template (so every character of a prompt is a token of its own)."""
import json
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import msrnn
import msrnn.qa as qa
from msrnn.cli import main
from msrnn.generate import generate
from msrnn.policies import make_policy
from msrnn.stats import wilson
from msrnn.tasks import NEEDLE, Trial, chat_parts, is_correct, needle_trial, parse_number, recall_trial
from tiny import hf_model, save

CHARS = ["[UNK]", "\n"] + [chr(c) for c in range(32, 127)]  # 97 ids = the tiny model's vocabulary; "~" (96) ends
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama with a character-level tokenizer.json and a chat template beside it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    directory = tmp_path_factory.mktemp("tiny-chat")
    save(hf_model(seed=5, max_position_embeddings=256, eos_token_id=96, bos_token_id=None), directory)
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character a token
    tok.decoder = decoders.Fuse()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return directory


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return msrnn.load(checkpoint)


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    """Short sentences of random lowercase words: a haystack with a sentence end every few dozen characters."""
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(60)]
    text = " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))).capitalize() + "." for _ in range(80))
    path = tmp_path_factory.mktemp("book") / "book.txt"
    path.write_text(text)
    return path


# --- the tasks ----------------------------------------------------------------------------------------------------
def test_a_needle_trial_is_a_function_of_its_seed(loaded, book):
    _, tok = loaded
    hay = tok.encode(book.read_text())
    trial = needle_trial(tok, hay, length=120, depth=50, seed=3)
    assert trial == needle_trial(tok, hay, length=120, depth=50, seed=3)  # the same, token for token
    assert len(trial.context) + len(trial.queries[0].ids) == 120  # exactly the length asked for
    value = trial.queries[0].answer
    assert len(value) == 5 and value.isdigit()
    a, b = trial.span
    assert tok.decode(trial.context[a:b]) == " " + NEEDLE.format(value=value)  # the span is the needle
    assert tok.decode(trial.context[a - 1 : a]) == "."  # moved to a sentence end
    other = needle_trial(tok, hay, length=120, depth=50, seed=4)
    assert other.queries[0].answer != value and other.context != trial.context
    deep = needle_trial(tok, hay, length=120, depth=90, seed=3)  # same passage and number, another place
    assert deep.queries[0] == trial.queries[0] and deep.coords["passage_start"] == trial.coords["passage_start"]
    assert deep.span[0] > a
    first, last = (needle_trial(tok, hay, 120, d, 3) for d in (0, 100))
    before, after = chat_parts(tok)
    assert first.span[0] == len(before) and last.span[1] == len(last.context)  # ends of the passage
    assert tok.decode(before) == "<user>" and tok.decode(after) == "\n<assistant>"
    assert tok.decode(trial.queries[0].ids) == "\n\nWhat is the secret number?\n<assistant>"


def test_a_needle_prompt_with_the_bundled_tokenizer_is_one_chat_turn():
    from msrnn.gguf import bundled_gguf_path
    from msrnn.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(bundled_gguf_path())
    hay = tok.encode("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                     "must be in want of a wife. " * 20)
    trial = needle_trial(tok, hay, length=200, depth=50, seed=0)
    prompt = tok.decode(trial.context + trial.queries[0].ids)
    assert len(trial.context) + len(trial.queries[0].ids) == 200
    assert prompt.count("<|im_start|>user\n") == 1 and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert f"wife. The secret number is {trial.queries[0].answer}. It is" in prompt


def test_a_recall_trial_is_a_function_of_its_seed(loaded):
    _, tok = loaded
    trial = recall_trial(tok, pairs=6, seed=2, queries=3)
    assert trial == recall_trial(tok, pairs=6, seed=2, queries=3) != recall_trial(tok, pairs=6, seed=3, queries=3)
    pairs = json.loads(tok.decode(trial.context).removeprefix("<user>"))  # the pairs are a JSON object
    assert len(pairs) == 6 and len(set(pairs.values())) == 6 and all(1000 <= v <= 9999 for v in pairs.values())
    assert len(set(trial.coords["asked"])) == 3
    for key, query in zip(trial.coords["asked"], trial.queries):
        assert f"value of {key}?" in tok.decode(query.ids) and query.answer == str(pairs[key])


def test_bad_task_arguments_are_clear_errors(loaded, book):
    _, tok = loaded
    hay = tok.encode(book.read_text())
    with pytest.raises(msrnn.InputError, match="longer length"):
        needle_trial(tok, hay, length=40, depth=50, seed=0)
    with pytest.raises(msrnn.InputError, match="fewer than"):
        needle_trial(tok, hay[:30], length=120, depth=50, seed=0)
    with pytest.raises(msrnn.InputError, match="value"):
        needle_trial(tok, hay, length=120, depth=50, seed=0, needle="The number is 5.")
    with pytest.raises(msrnn.InputError, match="0..100"):
        needle_trial(tok, hay, length=120, depth=150, seed=0)
    with pytest.raises(msrnn.InputError, match="queries"):
        recall_trial(tok, pairs=3, seed=0, queries=4)
    with pytest.raises(msrnn.InputError, match="chat template"):
        chat_parts(type("NoTemplate", (), {"chat_template": None})())


@pytest.mark.parametrize("text, number", [
    ("The secret number is 48213.", "48213"), ("48,213", "48213"), ("It is 12,345,678!", "12345678"),
    ("about 4821 3", "4821"), ("1,23", "1"), ("no digits here", None), ("048213", "048213"), ("x48213.5", "48213"),
])
def test_the_parser_reads_the_first_number(text, number):
    assert parse_number(text) == number


@given(st.integers(0, 10**12), st.text(alphabet="abc .:\n", max_size=20), st.text(alphabet="abc .:\n", max_size=20),
       st.booleans())
def test_a_number_in_any_words_is_found_with_or_without_separators(value, before, after, commas):
    written = f"{value:,}" if commas else str(value)
    assert parse_number(before + written + after) == str(value)
    assert is_correct(before + written + after, str(value)) and not is_correct(before + written + after, str(value + 1))


def test_wilson_interval_known_values():
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_holds_the_rate_and_is_symmetric(kn):
    k, n = kn
    low, high = wilson(k, n)
    assert 0 <= low <= k / n <= high <= 1
    assert (low, high) == pytest.approx((1 - wilson(n - k, n)[1], 1 - wilson(n - k, n)[0]), abs=1e-12)


# --- answering ----------------------------------------------------------------------------------------------------
def alone(model, trial: Trial, policy, prefill="exact", max_new_tokens=6) -> list[list[int]]:
    """The definition, nothing shared: each query answered by its own run, one prompt alone. exact: plain greedy
    generation of context + query; fast: the context in one pass and one eviction, then the query and the answer by
    the recurrence."""
    answers = []
    for q in trial.queries:
        if prefill == "exact":
            answers.append(list(generate(model, trial.context + q.ids, policy=policy, max_new_tokens=max_new_tokens,
                                         stop_at_eos=False)))
            continue
        _, state = model.prefill(torch.tensor([trial.context]), None, policy, mode="fast")
        logits, state = model.prefill(torch.tensor([q.ids]), state, policy, mode="exact")  # == stepping (test_scan)
        ids = []
        for _ in range(max_new_tokens):
            ids.append(int(logits[0].argmax()))
            logits, state = model.step(torch.tensor(ids[-1:]), state, policy)
        answers.append(ids)
    return answers


@pytest.mark.parametrize("prefill", ["exact", "fast"])
def test_batched_answers_equal_each_prompt_alone(loaded, book, prefill):
    """Four bounded policies, two budgets, two trials in one batch state, recall with two queries per context:
    each answer equals the same prompt answered alone (generate / step)."""
    model, tok = loaded
    hay = tok.encode(book.read_text())
    policies = [make_policy(n, k) for n, k in (("tova", 12), ("h2o", 12), ("tova", 40), ("h2o", 40), ("window", 12),
                                                ("sinks", 40))]
    for trials in ([needle_trial(tok, hay, 100, d, 0) for d in (20, 70)], [recall_trial(tok, 4, s, 2) for s in (0, 1)]):
        trials = [t for t in trials if t.shape == trials[0].shape]
        got = qa.answer(model, trials, [None, *policies], prefill, max_new_tokens=6)
        for i, policy in enumerate([None, *policies]):
            for b, trial in enumerate(trials):
                assert got[i][b] == alone(model, trial, policy, prefill), (policy, trial.key)
        assert any(got[i] != got[0] for i in range(1, len(got)))  # small budgets do change answers


def test_a_budget_covering_the_prompt_gives_the_full_models_answers(loaded, book):
    model, tok = loaded
    trials = [needle_trial(tok, tok.encode(book.read_text()), 90, d, s) for d in (0, 50, 100) for s in (0, 1)]
    L = len(trials[0]) + 12  # the prompt and every answer token: nothing is ever evicted
    policies = [None] + [make_policy(n, L) for n in ("tova", "h2o", "h2o-layer", "window", "sinks", "tova-head")]
    got = qa.answer(model, trials, policies, max_new_tokens=12)
    assert all(answers == got[0] for answers in got[1:])
    assert len({tuple(a[0]) for a in got[0]}) > 1  # the trials do get different answers


def test_answer_refuses_trials_of_different_shapes(loaded, book):
    model, tok = loaded
    hay = tok.encode(book.read_text())
    with pytest.raises(msrnn.InputError, match="one shape"):
        qa.answer(model, [needle_trial(tok, hay, 90, 50, 0), needle_trial(tok, hay, 100, 50, 0)], [None])


# --- the commands -------------------------------------------------------------------------------------------------
def needle_args(checkpoint, book, out, *extra):
    return ["eval", "needle", "--text", str(book), "--model", str(checkpoint), "--lengths", "80,90",
            "--depths", "0,100", "--seeds", "2", "--policies", "tova,window", "--states", "10,30",
            "--batch", "4", "--max-new-tokens", "6", "--out", str(out), *extra]


def test_eval_needle_writes_tables_figures_and_resumes(checkpoint, book, tmp_path, monkeypatch, capsys):
    assert main(needle_args(checkpoint, book, tmp_path / "whole")) == 0
    table = (tmp_path / "whole" / "table.md").read_text()
    assert "| policy | length 80 | length 90 |" in table and "| tova k=10 |" in table and "| full |" in table
    result = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert len(result["cells"]) == 5 * 2 * 2  # (full + 2 policies x 2 budgets) x lengths x depths
    assert all(c["answers"] == 2 and c["low"] <= c["accuracy"] <= c["high"] for c in result["cells"])
    for name in ("full", "tova", "window"):
        assert (tmp_path / "whole" / f"needle-{name}.png").read_bytes()[:8] == PNG_MAGIC
    units = [json.loads(line) for line in (tmp_path / "whole" / "results.jsonl").read_text().splitlines()[1:]]
    assert len(units) == 5 * 8 and {len(u["answers"]) for u in units} == {1}

    record, calls = qa.record, []

    def interrupt_after_seven(path, unit):
        record(path, unit)
        calls.append(unit)
        if len(calls) == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(qa, "record", interrupt_after_seven)
    with pytest.raises(SystemExit) as stop:
        main(needle_args(checkpoint, book, tmp_path / "cut"))
    assert stop.value.code == 130 and "--resume" in capsys.readouterr().err
    monkeypatch.setattr(qa, "record", record)
    assert main(needle_args(checkpoint, book, tmp_path / "cut", "--resume")) == 0
    assert "7 answers already done" in capsys.readouterr().err
    assert (tmp_path / "cut" / "table.md").read_text() == table
    with pytest.raises(SystemExit) as stop:  # other settings: one clear error
        main(needle_args(checkpoint, book, tmp_path / "cut", "--resume", "--prefill", "fast"))
    assert stop.value.code == 2 and "prefill 'fast' (was 'exact')" in capsys.readouterr().err


def test_eval_recall_writes_table_and_figure(checkpoint, tmp_path, capsys):
    args = ["eval", "recall", "--model", str(checkpoint), "--pairs", "2,4", "--seeds", "2", "--queries", "2",
            "--policies", "tova,h2o", "--states", "8,16", "--max-new-tokens", "4", "--out", str(tmp_path)]
    assert main(args) == 0
    table = (tmp_path / "table.md").read_text()
    assert "| policy | pairs 2 | pairs 4 |" in table
    rows = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert len(rows) == 5 * 2 and all(r["answers"] == 4 for r in rows)  # 2 contexts x 2 queries per cell
    assert (tmp_path / "recall.png").read_bytes()[:8] == PNG_MAGIC
    assert "trials x 5 cells (policy x budget, full once)" in capsys.readouterr().err  # says what a cell is


def test_trace_names_the_layers_that_dropped_the_needle(loaded, book, tmp_path):
    """A needle a window of 10 states has left long behind: no layer holds any of its tokens when the answer
    begins, and each was dropped exactly 11 steps after it entered (window keeps a token k + 1 steps)."""
    model, tok = loaded
    trial = needle_trial(tok, tok.encode(book.read_text()), 100, 0, 0)
    units = {("full", None, trial.key): {"correct": [True], "answers": ["12345"]},
             ("window", 10, trial.key): {"correct": [False], "answers": ["nope"]}}
    args = type("Args", (), {"prefill": "exact", "trace_failures": 3, "positions": None})()
    qa.trace_failures(model, tok, [trial], units, [("full", None), ("window", 10)], args, tmp_path)
    row = (tmp_path / "trace.md").read_text().splitlines()[-1]
    a, b = trial.span
    median = float(torch.tensor([p + 10 - (b - 1) for p in range(a, b)]).float().median())
    assert row == f"| window k=10 | {trial.key} | 'nope' | 0/2 | 2/2 | {median:.0f} |"
    assert (tmp_path / f"trace-window-k10-{trial.key.replace('/', '-')}.png").read_bytes()[:8] == PNG_MAGIC


def test_bad_options_are_one_line_errors_before_loading(checkpoint, book, capsys):
    for extra, message in ((["--seeds", "0"], "--seeds 0"), (["--batch", "0"], "--batch 0"),
                           (["--depths", "0,120"], "0..100"), (["--lengths", "80,x"], "--lengths"),
                           (["--states", "0"], "--states")):
        with pytest.raises(SystemExit) as stop:
            main(needle_args(checkpoint, book, "unused", *extra))
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_the_recall_figure_keeps_its_title_inside_and_its_legend_off_the_data():
    """One budget (the narrowest figure) and the long title the command writes: the title wraps inside the figure,
    and the legend sits outside every panel."""
    from msrnn.qa import plot_recall

    rows = [{"policy": p, "states": k, "pairs": n, "accuracy": 0.5, "low": 0.2, "high": 0.8}
            for p, k in [("full", None), ("tova", 32), ("h2o", 32), ("sinks", 32)] for n in (4, 8, 16)]
    title = "Associative recall: 3 contexts x 4 queries per number of pairs, exact prefill, 3 policies at 1 budget"
    fig = plot_recall(rows, ["full", "tova", "h2o", "sinks"], [32], [4, 8, 16], None, title)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    heading = fig._suptitle.get_window_extent(renderer)
    assert page.x0 <= heading.x0 and heading.x1 <= page.x1 and heading.y1 <= page.y1, (heading, page)
    legend = fig.legends[0].get_window_extent(renderer) if fig.legends else None
    assert legend is not None and page.x0 <= legend.x0 and legend.x1 <= page.x1
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent(renderer)), "the legend covers a panel"
