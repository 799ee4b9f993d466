"""`msrnn eval stream` with several position schemes and fresh-read controls, and the `rebase` position scheme, on
the tiny checkpoint of test_eval (a random Llama trained for 64 positions, word-level tokenizer): a control equals
the recurrence stepped over its own text, a batch of schemes equals one run per scheme, rebase equals absolute where
it cannot matter and keeps every position inside the trained context, bad options end in one msrnn error."""
import csv
import json
import math

import pytest
import torch

from msrnn.batch import RowPolicies
from msrnn.cli import main
from msrnn.policies import make_policy
from msrnn.state import EMPTY
from msrnn.stream import control_windows, stream_windows
from test_eval import PNG_MAGIC, checkpoint, model, text_file  # noqa: F401 (fixtures)

TOL = 1e-5  # fp32: the same operations batched differently (rows of a batch, a piece of tokens at once)


def ids(n=200, seed=1):
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed))


def stepped_loss(model, tokens, policy, score_from=0):
    """The definition: token by token from an empty state; summed next-token loss of indices score_from .. L-2."""
    state, total = model.init_state(1, policy), 0.0
    for t in range(len(tokens) - 1):
        logits, state = model.step(tokens[t : t + 1], state, policy)
        if t >= score_from:
            total -= float(torch.log_softmax(logits[0], -1)[tokens[t + 1]])
    return total


def test_a_control_is_the_recurrence_over_its_window_and_warm_up(model):
    text, policy = ids(), make_policy("tova", 8)
    windows = [(0, 50), (50, 100), (100, 150), (150, 199)]  # the first has no warm-up, the last is shorter
    got = control_windows(model, text, policy, windows, warmup=20, batch=2, piece=16)
    assert [(c["start"], c["end"], c["warmup"]) for c in got] == [(1, 50, 0), (51, 100, 20), (101, 150, 20),
                                                                  (151, 199, 20)]
    for (s, e), c in zip(windows, got):
        a = max(0, s - 20)
        want = stepped_loss(model, text[a : e + 1], policy, score_from=s - a) / (e - s)
        assert math.log(c["ppl"]) == pytest.approx(want, rel=TOL)


@pytest.mark.parametrize("schemes", [("absolute", "rebase"), ("shift", "loglog"), ("absolute", "shift", "rebase")])
def test_schemes_batched_as_rows_equal_one_run_each(model, schemes):
    # the third mixes cached and rotate-at-use schemes: every row then rotates at use, absolute and rebase included
    text = ids()
    members = [make_policy("tova", 8, s) for s in schemes]
    batched = stream_windows(model, text, RowPolicies(members, rows=1), window=40, piece=16, rows=len(members))
    for member, rows in zip(members, batched):
        alone = stream_windows(model, text, member, window=40, piece=16)[0]
        assert [r["end"] for r in rows] == [r["end"] for r in alone] == [40, 80, 120, 160, 199]
        for r, a in zip(rows, alone):
            assert r["ppl"] == pytest.approx(a["ppl"], rel=TOL)


def test_stream_windows_are_the_stepped_recurrence(model):
    text, policy = ids(120), make_policy("tova", 8, "rebase")
    rows = stream_windows(model, text, policy, window=50, piece=16)[0]
    for r in rows:
        want = stepped_loss(model, text[: r["end"] + 1], policy, score_from=r["start"] - 1) / (r["end"] - r["start"] + 1)
        assert math.log(r["ppl"]) == pytest.approx(want, rel=TOL)


def test_rebase_is_absolute_inside_the_trained_context(model):
    text = ids(60)  # the tiny model's context is 64: no rebase happens
    a = model.prefill(text[None], None, make_policy("tova", 8), all_logits=True, chunk=16)[0]
    b = model.prefill(text[None], None, make_policy("tova", 8, "rebase"), all_logits=True, chunk=16)[0]
    assert torch.equal(a, b)


def test_rebase_keeps_every_position_inside_the_trained_context(model):
    policy, limit = make_policy("sinks", 8, "rebase"), model.cfg.max_position_embeddings
    state, renumbered = model.init_state(1, policy), 0
    for t, token in enumerate(ids(300)):
        before = int(state.next_pos)
        model.step(token[None], state, policy)
        assert int(state.next_pos) <= limit
        if int(state.next_pos) < before + 1:  # a rebase happened before this token: held 0..7, the token at 8
            renumbered += 1
            for layer in state.layers:
                held = sorted(p for p in layer.pos[0, 0, : layer.size].tolist() if p != EMPTY)
                assert held == [0, 1, 2, 3, 5, 6, 7, 8]  # sinks 0-3 and a window renumbered 4-7, one step on
    assert renumbered == (300 - 64) // (64 - 8) + 1  # every 56 tokens once the first 64 are read


def test_a_prefill_chunk_that_reaches_the_trained_context_twice_rebases_twice(model):
    # the chunk of 60 tokens starts at the limit (64): rebased, the state holds 8 and the stream goes on from 8, so
    # the same chunk reaches the limit again after 56 tokens and must be split there, as stepping does
    text, policy = ids(124), make_policy("tova", 8, "rebase")
    logits, state = model.prefill(text[None], None, policy, all_logits=True, chunk=64)
    ref_state = model.init_state(1, policy)
    stepped = torch.stack([model.step(t[None], ref_state, policy)[0][0] for t in text])
    torch.testing.assert_close(logits[0], stepped, rtol=0, atol=TOL)
    assert int(state.next_pos) == int(ref_state.next_pos) <= model.cfg.max_position_embeddings
    # a budget that fills the context by itself (70 > 64) renumbers before every token once full, as stepping does
    text, policy = ids(80), make_policy("sinks", 70, "rebase")
    logits, state = model.prefill(text[None], None, policy, all_logits=True, chunk=32)
    ref_state = model.init_state(1, policy)
    stepped = torch.stack([model.step(t[None], ref_state, policy)[0][0] for t in text])
    torch.testing.assert_close(logits[0], stepped, rtol=0, atol=TOL)
    assert int(state.next_pos) == int(ref_state.next_pos)


def test_rebase_reaches_the_trained_context_with_nothing_held(model):
    # baseline(1) holds nothing after every second token: at the limit (64) there is nothing to renumber
    text, policy = ids(70), make_policy("baseline", 1, "rebase")
    state = model.init_state(1, policy)
    for token in text:
        model.step(token[None], state, policy)
    assert int(state.next_pos) < model.cfg.max_position_embeddings


def test_rebase_changes_nothing_for_a_window(model):
    # a window holds consecutive tokens, so renumbering them 0..k-1 keeps every distance: RoPE sees the same thing
    text = ids(200)
    a = model.prefill(text[None], None, make_policy("window", 8), all_logits=True, chunk=16)[0]
    b = model.prefill(text[None], None, make_policy("window", 8, "rebase"), all_logits=True, chunk=16)[0]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # angles of positions up to 200 vs 64 round differently


def cli(checkpoint, text_file, out, *extra):
    return main(["eval", "stream", "--text", str(text_file), "--model", str(checkpoint), "--policy", "tova",
                 "--states", "8", "--tokens", "200", "--window", "50", "--full-tokens", "0", "--out", str(out), *extra])


def test_eval_stream_compares_schemes_against_controls(checkpoint, text_file, tmp_path, capsys):
    assert cli(checkpoint, text_file, tmp_path, "--positions", "absolute,shift,rebase", "--control", "2",
               "--control-warmup", "10") == 0
    res = json.loads((tmp_path / "stream.json").read_text())
    labels = ["tova k=8 absolute", "tova k=8 shift", "tova k=8 rebase"]
    assert res["labels"] == labels and list(res["runs"]) == labels  # --full-tokens 0: no full run
    assert [(c["start"], c["end"]) for c in res["control"]] == [(101, 150), (151, 199)]
    for s in res["summary"]:
        stream = [r for r in res["runs"][s["run"]] if r["start"] > 100]
        assert s["ratio"] == pytest.approx(s["stream_ppl"] / s["control_ppl"])
        assert min(r["ppl"] for r in stream) <= s["stream_ppl"] <= max(r["ppl"] for r in stream)
    table = (tmp_path / "stream.md").read_text()
    assert "stream / fresh" in table and "tova k=8 shift / control" in table
    with (tmp_path / "stream.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 3 * 4 + 2
    assert (tmp_path / "stream.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("extra, says", [
    (["--positions", "absolute,nope"], "'nope' is not a position scheme"),
    (["--positions", "shift,shift"], "names a scheme twice"),
    (["--control", "-1"], "give counts >= 0"),
    (["--control", "2", "--control-warmup", "30"], "the control would itself run past it"),
    (["--policy", "full", "--positions", "absolute,shift"], "no position scheme to compare"),
])
def test_bad_stream_options_end_in_one_msrnn_error(checkpoint, text_file, tmp_path, capsys, extra, says):
    with pytest.raises(SystemExit) as e:
        cli(checkpoint, text_file, tmp_path, *extra)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("msrnn: error:") and says in err and "Traceback" not in err
