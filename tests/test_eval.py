"""msrnn.eval against the definition: each policy's loss equals a plain token-by-token run of the recurrence from an
empty state, whatever the shortcuts (shared prefix, full reference, many policies and chunks in one batch); and the
`msrnn eval ppl|stream` commands on a tiny checkpoint with a tiny word-level tokenizer (the real loading path)."""
import csv
import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

import msrnn
import msrnn.eval as ev
import msrnn.ppl as eval_ppl
from msrnn.cli import main
from msrnn.policies import make_policy
from tiny import hf_model, save

BOUNDED = ["baseline", "window", "sinks", "h2o", "h2o-layer", "tova-head", "tova"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WORDS = [f"w{i}" for i in range(96)]  # + [UNK] = 97 ids = the tiny model's vocabulary


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama saved as a checkpoint directory, with a word-level tokenizer.json beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory = tmp_path_factory.mktemp("tiny")
    save(hf_model(seed=3, max_position_embeddings=64), directory)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def model(checkpoint):
    return msrnn.load_model(checkpoint)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "story.txt"
    path.write_text(" ".join(rng.choice(WORDS[:40]) for _ in range(200)))  # 200 tokens, a skewed vocabulary
    return path


def chunks(n=3, T=30, seed=0):
    return torch.randint(0, 97, (n, T), generator=torch.Generator().manual_seed(seed))


def naive(model, row, policy, prefill="exact", prompt=0):
    """The definition, with nothing shared: log-probs (T-1, V) of one chunk, token by token from an empty state
    (a fast-mode prompt goes through model.prefill(mode="fast") first)."""
    state, out = model.init_state(1, policy), []
    if prefill == "fast":
        logits, state = model.prefill(row[None, :prompt], state, policy, mode="fast", all_logits=True)
        out += list(logits[0])
    for t in range(len(out), len(row) - 1):
        logits, state = model.step(row[t : t + 1], state, policy)
        out.append(logits[0])
    return torch.log_softmax(torch.stack(out), dim=-1)


def test_full_ppl_is_the_cross_entropy_of_the_parallel_forward(model):
    tokens = chunks(2)
    losses = ev.perplexity(model, tokens)
    assert losses.shape == (2, 29) and losses.dtype == torch.float32
    direct = F.cross_entropy(model(tokens)[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")  # (2, 29)
    torch.testing.assert_close(losses, direct, atol=1e-5, rtol=1e-5)
    one = ev.compare(model, tokens[0], None)
    assert one.loss.shape == (29,) and one.agreement == 1.0 and one.mean_kl == 0.0
    assert one.ppl == pytest.approx(float(direct[0].mean().exp()), rel=1e-5)


@pytest.mark.parametrize("name", BOUNDED)
def test_a_budget_covering_the_chunk_equals_full_exactly(model, name):
    tokens = chunks(2)
    full = ev.compare(model, tokens, None)
    for k in (29, 30, 64):  # 29 = T-1: the last token would be the first to evict, after the last prediction
        s = ev.compare(model, tokens, make_policy(name, k))
        assert torch.equal(s.loss, full.loss) and s.agree.all() and not s.kl.any()


def test_every_shortcut_equals_the_plain_recurrence(model):
    """All bounded policies x three budgets x 3 chunks in ONE batch (RowPolicies, per-row budgets, shared prefix,
    reference copied before the first eviction) give each chunk's loss, top-1 agreement and KL of a plain
    token-by-token run of that chunk alone."""
    tokens = chunks(3)
    policies = [make_policy(name, k) for name in BOUNDED for k in (5, 9, 14)]
    batched = ev.score(model, tokens, policies)
    full = torch.log_softmax(model(tokens)[:, :-1], dim=-1)  # (3, 29, V)
    for policy, s in zip(policies, batched):
        assert s.loss.shape == (3, 29)
        for b in range(3):
            alone = naive(model, tokens[b], policy)  # (29, V)
            torch.testing.assert_close(s.loss[b], -alone.gather(-1, tokens[b, 1:, None])[:, 0], atol=2e-5, rtol=1e-5)
            assert torch.equal(s.agree[b], full[b].argmax(-1) == alone.argmax(-1))
            torch.testing.assert_close(s.kl[b], ev.kl_full_policy(full[b], alone), atol=2e-5, rtol=1e-4)
    assert min(s.mean_kl for s in batched) > 1e-3  # every policy does evict, and it shows
    for policy in policies[::5]:  # one chunk, one policy
        torch.testing.assert_close(ev.perplexity(model, tokens[1], policy), batched[policies.index(policy)].loss[1],
                                   atol=2e-5, rtol=1e-5)


def test_fast_mode_is_one_compressed_prompt_then_the_recurrence(model):
    """Budgets below and above the prompt in one batch: each equals model.prefill(mode="fast") of the prompt, then
    the recurrence; and an exact run given the same prompt scores the same tokens."""
    tokens, P = chunks(2, T=32), 16
    policies = [make_policy(name, k) for name, k in [("tova", 6), ("h2o", 6), ("window", 20), ("baseline", 6),
                                                      ("sinks", 20), ("tova-head", 9)]]
    fast = ev.score(model, tokens, policies, prefill="fast")  # default prompt T//2 = 16
    exact = ev.score(model, tokens, policies)
    for policy, f, e in zip(policies, fast, exact):
        assert f.loss.shape == (2, 32 - P)
        for b in range(2):
            alone = naive(model, tokens[b], policy, "fast", P)[P - 1 :]
            torch.testing.assert_close(f.loss[b], -alone.gather(-1, tokens[b, P:, None])[:, 0], atol=2e-5, rtol=1e-5)
        scored = ev.perplexity(model, tokens, policy, prompt=P)
        torch.testing.assert_close(scored, e.loss[:, P - 1 :], atol=2e-5, rtol=1e-5)  # the same tokens
        if policy.states < P:  # one eviction of the prompt is not one eviction per token
            assert not torch.allclose(f.loss, e.loss[:, P - 1 :])
        else:
            torch.testing.assert_close(f.loss, e.loss[:, P - 1 :], atol=2e-5, rtol=1e-5)


def test_bad_arguments_are_clear_errors(model):
    with pytest.raises(msrnn.InputError, match="prefill"):
        ev.perplexity(model, chunks(1)[0], prefill="slow")
    with pytest.raises(msrnn.InputError, match="prompt"):
        ev.perplexity(model, chunks(1)[0], make_policy("tova", 4), prompt=30)
    with pytest.raises(msrnn.InputError, match="T >= 2"):
        ev.perplexity(model, torch.tensor([3]))
    with pytest.raises(msrnn.InputError, match="Policy"):
        ev.perplexity(model, chunks(1)[0], "tova")


# --- the commands --------------------------------------------------------------------------------------------------
def ppl_args(checkpoint, text_file, out, *extra):
    return ["eval", "ppl", "--text", str(text_file), "--model", str(checkpoint), "--states", "6,12",
            "--context", "24", "--chunks", "3", "--batch", "2", "--out", str(out), *extra]


def test_eval_ppl_writes_table_csv_json_png(checkpoint, text_file, tmp_path, capsys):
    assert main(ppl_args(checkpoint, text_file, tmp_path)) == 0
    printed = capsys.readouterr().out
    table = (tmp_path / "table.md").read_text()
    assert table in printed and "| policy | 6 | 12 |" in table
    for name in eval_ppl.DEFAULT_POLICIES.split(","):
        assert f"| {name} |" in table
    with (tmp_path / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 + 6 * 2 and {"ppl", "top1_agreement", "kl"} <= set(rows[0])
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["settings"]["chunks"] == [1, 4, 6] and len(result["cells"]) == 13  # middles of 3 parts of 8 chunks
    full = next(c for c in result["cells"] if c["policy"] == "full")
    assert full["tokens"] == 3 * 23 and full["top1_agreement"] == 1.0 and full["kl"] == 0.0
    assert (tmp_path / "ppl.png").read_bytes()[:8] == PNG_MAGIC


def test_compare_pairs_every_policy_with_one_over_the_same_chunks(checkpoint, text_file, tmp_path, capsys):
    """--compare tova: the PPL ratio and the share of TOVA's gap to full closed, each from the per-chunk sums of
    results.jsonl (point values by hand here), with a paired interval that holds the point value; a name that is
    not measured is refused before anything runs."""
    assert main(ppl_args(checkpoint, text_file, tmp_path, "--policies", "tova,h2o,window", "--compare", "tova")) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    ppl = {(c["policy"], c["states"]): c["ppl"] for c in result["cells"]}
    units = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()[1:]]
    def by_chunks(name, k):  # PPL from the per-chunk sums (3 chunks over 2 batches)
        parts = [u for u in units if u["policy"] == name and u["states"] == k]
        return math.exp(sum(sum(u["chunk_loss"]) for u in parts) / sum(sum(u["chunk_tokens"]) for u in parts))
    assert by_chunks("h2o", 6) == pytest.approx(ppl["h2o", 6], rel=1e-9)
    pairs = {(r["policy"], r["states"]): r for r in result["paired"]}
    assert set(pairs) == {(n, k) for n in ("h2o", "window") for k in (6, 12)}
    for (name, k), r in pairs.items():
        assert r["ratio"] == pytest.approx(ppl[name, k] / ppl["tova", k], rel=1e-9)
        gap = (ppl["tova", k] - ppl[name, k]) / (ppl["tova", k] - ppl["full", None])
        assert r["gap_closed"] == pytest.approx(gap, rel=1e-9)
        assert r["ratio_low"] <= r["ratio"] <= r["ratio_high"]
    table = (tmp_path / "table.md").read_text()
    assert "PPL / PPL of tova, paired" in table and "| h2o | " in table.split("paired")[1]
    with pytest.raises(SystemExit):
        main(ppl_args(checkpoint, text_file, tmp_path / "x", "--policies", "tova,h2o", "--compare", "sinks"))
    assert "--compare sinks" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_interrupted_run_resumes_to_the_same_table(checkpoint, text_file, tmp_path, monkeypatch, capsys):
    assert main(ppl_args(checkpoint, text_file, tmp_path / "whole")) == 0
    record, calls = eval_ppl.record, []

    def interrupt_after_five(path, unit):
        record(path, unit)
        calls.append(unit)
        if len(calls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(eval_ppl, "record", interrupt_after_five)
    with pytest.raises(SystemExit) as stop:
        main(ppl_args(checkpoint, text_file, tmp_path / "cut"))
    assert stop.value.code == 130 and "--resume" in capsys.readouterr().err
    assert len((tmp_path / "cut" / "results.jsonl").read_text().splitlines()) == 1 + 5  # settings + finished units
    monkeypatch.setattr(eval_ppl, "record", record)
    assert main(ppl_args(checkpoint, text_file, tmp_path / "cut", "--resume")) == 0
    assert (tmp_path / "cut" / "table.md").read_text() == (tmp_path / "whole" / "table.md").read_text()
    with pytest.raises(SystemExit) as stop:  # other settings: one clear error, nothing overwritten
        main(ppl_args(checkpoint, text_file, tmp_path / "cut", "--resume", "--prefill", "fast"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "msrnn: error: --resume" in err and "prefill 'fast' (was 'exact')" in err


def test_two_torchrun_processes_give_the_table_of_one(checkpoint, text_file, tmp_path):
    """`torchrun --nproc_per_node 2 -m msrnn eval ppl ...` deals the batches out to two CPU processes (gloo) and
    writes the same table as one process: the same units, summed in the same order."""
    import subprocess
    import sys

    assert main(ppl_args(checkpoint, text_file, tmp_path / "one")) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "msrnn", *ppl_args(checkpoint, text_file, tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    units = [json.loads(line) for line in (tmp_path / "two" / "results.jsonl").read_text().splitlines()[1:]]
    assert sorted(u["batch"] for u in units) == [0] * 13 + [1] * 13  # 3 chunks in batches of 2: one per process
    assert (tmp_path / "two" / "table.md").read_text() == (tmp_path / "one" / "table.md").read_text()


def test_eval_stream_reports_ppl_and_rss_per_window(checkpoint, text_file, tmp_path, capsys):
    assert main(["eval", "stream", "--text", str(text_file), "--model", str(checkpoint), "--policy", "tova",
                 "--states", "8", "--tokens", "450", "--window", "100", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "stream.md").read_text()
    assert "repeated 3 times" in table and "first 64 tokens" in table  # 200-token text; full up to its context
    result = json.loads((tmp_path / "stream.json").read_text())
    bounded, full = result["runs"]["tova k=8"], result["runs"]["full"]
    assert [r["end"] for r in bounded] == [100, 200, 300, 400, 449] and [r["end"] for r in full] == [63]
    assert all(r["peak_rss_mib"] > 0 and r["rss_mib"] > 0 for r in bounded + full)
    assert len({r["state_mib"] for r in bounded}) == 1  # the bounded state holds k states per layer throughout
    with (tmp_path / "stream.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (tmp_path / "stream.png").read_bytes()[:8] == PNG_MAGIC


def test_a_policy_file_runs_only_after_the_other_arguments_are_checked(checkpoint, text_file, tmp_path, capsys):
    marker = tmp_path / "ran"
    (tmp_path / "mine.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom msrnn.policies import TOVA\n"
                                      "class Mine(TOVA):\n    name = 'mine'\n")
    for bad in (["--states", "0"], ["--states", "x"], ["--batch", "0"]):
        with pytest.raises(SystemExit):
            main([*ppl_args(checkpoint, text_file, tmp_path / "out"), "--policies", f"{tmp_path / 'mine.py'}:Mine",
                  *bad])
        assert "msrnn: error:" in capsys.readouterr().err and not marker.exists()


@pytest.mark.parametrize("command, folder", [("ppl", "eval-story"), ("stream", "stream-story")])
def test_eval_without_out_writes_into_a_folder_named_after_the_text(checkpoint, text_file, tmp_path, monkeypatch,
                                                                     capsys, command, folder):
    """No --out: out/eval-<text name> (ppl) or out/stream-<text name> (stream), never a folder literally called
    'eval-<text name>' (which a second text would then overwrite)."""
    monkeypatch.chdir(tmp_path)
    args = (["--states", "6", "--policies", "tova", "--context", "24", "--chunks", "1"] if command == "ppl" else
            ["--states", "6", "--tokens", "60", "--window", "30", "--full-tokens", "0"])
    assert main(["eval", command, "--text", str(text_file), "--model", str(checkpoint), *args]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [folder]


def test_a_policy_file_that_exits_while_loading_is_an_error_not_a_silent_exit(checkpoint, text_file, tmp_path, capsys):
    (tmp_path / "quits.py").write_text("raise SystemExit(0)\n")
    with pytest.raises(SystemExit) as stop:
        main([*ppl_args(checkpoint, text_file, tmp_path / "out"), "--policies", f"{tmp_path / 'quits.py'}:Mine"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "msrnn: error: policy file" in err and "SystemExit" in err


def test_a_context_past_the_trained_length_is_said_and_the_bar_counts_the_reference(checkpoint, text_file, tmp_path,
                                                                                   monkeypatch, capsys):
    """--context 100 on a model trained on 64 positions: a warning says so; the progress bar's total counts the full
    model's reference pass too (it moves while the reference runs, instead of sitting at 0 and then giving an ETA
    computed from that wait), and its updates add up to the total."""
    bars = []

    class Bar:
        def __init__(self, total, *args, **kwargs):
            self.total, self.updates = total, []
            bars.append(self)

        def update(self, n):
            self.updates.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def close(self):
            pass

    monkeypatch.setattr(eval_ppl, "progress", Bar)
    assert main(["eval", "ppl", "--text", str(text_file), "--model", str(checkpoint), "--policies", "tova",
                 "--states", "6", "--context", "100", "--chunks", "1", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "--context 100 is past the model's trained context of 64 tokens" in err
    (bar,) = bars
    assert bar.total == (100 - 6) + (100 - 1)  # the policy's recurrent steps + the reference's tokens
    assert sum(bar.updates) == bar.total and bar.updates[0] == 99  # the reference first, then the policies


def test_a_reference_larger_than_the_memory_is_refused_before_it_runs(checkpoint, text_file, tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setattr(eval_ppl, "physical_memory", lambda: 10_000)  # bytes: less than 1 x 199 x 97 x 4
    with pytest.raises(SystemExit) as stop:
        main(["eval", "ppl", "--text", str(text_file), "--model", str(checkpoint), "--policies", "tova",
              "--states", "6", "--context", "100", "--chunks", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "log-probabilities" in err and "give a smaller --batch or --context" in err
