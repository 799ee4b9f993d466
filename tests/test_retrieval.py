"""Memory beyond recency: the retrieval policy (msrnn/policies/retrieval.py) and `msrnn calibrate`
(msrnn/calibrate.py). Budgets by hand; HeadMix's priority on hand-built tensors; on a tiny model with a calibration
of its own the policy equals the one-page reference (msrnn/reference.py) token by token and layer-major, every kv
head holding exactly its budget; the calibration's loss with no head cut is the full model's own answer loss, its
rounds halve the heads still whole, and the command writes its files; the bundled calibration ranks every head of
the bundled model once."""
import json

import pytest
import torch

import msrnn
from msrnn import calibrate
from msrnn.cli import main
from msrnn.errors import InputError
from msrnn.policies import INF, HeadMix, Retrieval, head_budgets, make_policy, read_calibration
from msrnn.reference import Reference
from test_reference import held, tiny
from test_tasks import checkpoint, loaded  # noqa: F401 (the tiny chat model's fixtures)

TOL = 1e-5


def write_calibration(path, layers, heads, ranking):
    path.write_text(json.dumps({"layers": layers, "kv_heads": heads, "ranking": ranking}))
    return str(path)


def test_head_budgets_by_hand():
    # N = 6 heads, k = 16, ratio 4, stream 1/4: s = 4, R = floor(6 * 12 / (64 - 4)) = 1, k_r = 96 - 5 * 4 = 76
    ranking = [(1, 2), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    budgets, chosen = head_budgets(ranking, 2, 3, 16, 4, 0.25, 1)
    assert budgets == [[4, 4, 4], [4, 4, 76]] and chosen == [(1, 2)]
    # k = 256 on the bundled shape (30 x 3), the defaults: s = 64, R = floor(90 * 192 / 1984) = 8, shared 17792
    ranking = [(i, h) for i in range(30) for h in range(3)]
    budgets, chosen = head_budgets(ranking, 30, 3, 256, 8, 0.25, 4)
    assert len(chosen) == 8 and sum(map(sum, budgets)) == 90 * 256
    assert sorted(k for layer in budgets for k in layer)[-8:] == [2224] * 8
    budgets, chosen = head_budgets(ranking, 30, 3, 10, 8, 0.25, 4)  # s = max(2.5, sinks + 1) = 5
    assert sum(map(sum, budgets)) == 900 and min(map(min, budgets)) == 5


def test_head_mix_priority_by_hand():
    # 2 kv heads of 2 query heads each; head 0 retrieves (its queries' mean attention), head 1 streams (newest)
    policy = HeadMix([3, 2], [True, False], sinks=1)
    attn = torch.tensor([[[0.1, 0.6, 0.2, 0.1], [0.3, 0.4, 0.2, 0.1],  # kv head 0's query heads
                          [0.7, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]]])  # kv head 1's
    pos = torch.tensor([[[0, 1, 2, 3], [0, 1, 2, 3]]])
    prio = policy.priority(attn, pos, torch.zeros(1, 2, 4))
    assert torch.allclose(prio[0, 0, 1:], torch.tensor([0.5, 0.2, 0.1])) and prio[0, 0, 0] == INF  # sink pinned
    assert prio[0, 1].tolist() == [INF, 1.0, 2.0, 3.0]
    assert policy.budget().flatten().tolist() == [3, 2] and policy.min_budget() == 2 and policy.states == 3


@pytest.mark.parametrize("kind, extra", [("llama", ""), ("mistral", ""), ("llama", ", sink_free=True")])
def test_retrieval_equals_the_reference_and_holds_its_budgets(tmp_path, kind, extra):
    model = tiny(kind, kv=2, groups=2, layers=3, window=5 if kind == "mistral" else None)
    cal = write_calibration(tmp_path / "c.json", 3, 2, [[1, 0], [2, 1], [0, 0], [0, 1], [1, 1], [2, 0]])
    policy = make_policy(f"retrieval(calibration={cal!r}, ratio=2, stream=0.5, sinks=1{extra})", 4)
    # N = 6, k = 4, stream 1/2: s = 2, R = floor(6 * 2 / (8 - 2)) = 2, sharing 24 - 4 * 2 = 16
    assert policy.budgets == [[2, 2], [8, 2], [2, 8]] and policy.retrieval == [(1, 0), (2, 1)]
    tokens = torch.randint(0, 61, (16,), generator=torch.Generator().manual_seed(4)).tolist()
    ref, state = Reference(model, policy), model.init_state(1, policy)
    for t, token in enumerate(tokens):
        expected = ref.step(token)
        logits, state = model.step(torch.tensor([token]), state, policy)
        torch.testing.assert_close(logits[0], expected, rtol=0, atol=TOL)
        assert held(state) == ref.held(), t
    assert [[len(h) for h in layer] for layer in held(state)] == policy.budgets  # each head full to its budget
    if extra:  # a sink-free retrieval head dropped the first token once it was over budget; the others keep it
        assert 0 not in held(state)[1][0] and 0 in held(state)[1][1] and 0 in held(state)[0][0]
    logits, scanned = model.prefill(torch.tensor([tokens]), None, policy, all_logits=True, chunk=5)
    assert held(scanned) == ref.held()


def test_retrieval_refuses_a_calibration_of_another_model(tmp_path):
    cal = write_calibration(tmp_path / "c.json", 2, 2, [[0, 0], [0, 1], [1, 0], [1, 1]])
    policy = Retrieval(16, calibration=cal)
    with pytest.raises(InputError, match="calibration .* of a model of 2 layers, not 3; calibrate this model"):
        tiny(layers=3).init_state(1, policy)
    with pytest.raises(InputError, match="does not exist; make one with `msrnn calibrate"):
        Retrieval(16, calibration=str(tmp_path / "none.json"))
    with pytest.raises(InputError, match="every \\(layer, kv head\\)"):
        Retrieval(16, calibration=write_calibration(tmp_path / "d.json", 2, 2, [[0, 0], [0, 0], [1, 0], [1, 1]]))
    with pytest.raises(InputError, match="ratio"):
        Retrieval(16, calibration=cal, ratio=0.5)
    with pytest.raises(InputError, match="heads=9 must be a whole number of kv heads in 1..4"):
        Retrieval(16, calibration=cal, heads=9)
    assert Retrieval(16, calibration=cal, heads=3).budgets == [[20, 20], [19, 5]]  # s = 5 (4 sinks + 1): 59 shared


def test_the_bundled_calibration_ranks_every_head_of_the_bundled_model():
    cal = read_calibration()
    assert (cal["layers"], cal["kv_heads"]) == (30, 3) and len(cal["ranking"]) == 90
    policy = make_policy("retrieval", 256)
    assert sum(map(sum, policy.budgets)) == 90 * 256  # the mean budget is what the user pays for


def test_calibration_loss_and_rounds_on_a_tiny_model(loaded):  # noqa: F811 (fixture)
    model, tok = loaded
    contexts, asked, digits = calibrate.prompts(tok, 3, 160)
    assert contexts.shape[0] == 3 and 100 < contexts.shape[1] < 160 and tok.decode(asked[0, digits].tolist()).strip().isdigit()
    ablation = calibrate.Ablation(model, contexts, asked, digits, stream=8, sinks=1)
    # with no head cut, the loss is the full model's own loss of the answer digits, read in one pass
    logits = model(torch.cat([contexts, asked], dim=1))[:, contexts.shape[1] - 1 : -1]  # [j] predicts asked[j]
    nll = -torch.log_softmax(logits[:, digits], -1).gather(-1, asked[:, digits, None])
    assert abs(ablation.loss([]) - float(nll.sum(dim=(1, 2)).mean())) < 1e-4
    assert ablation.loss([(0, 0), (1, 1)]) != ablation.loss([])  # a cut changes the answer's loss
    calls = []
    loss = ablation.loss
    ablation.loss = lambda cut: calls.append(list(cut)) or loss(cut)
    ranking, cost, rounds = calibrate.eliminate(ablation)
    assert sorted(ranking) == [(0, 0), (0, 1), (1, 0), (1, 1)] and set(cost) == set(ranking)
    assert [r["whole"] for r in rounds] == [4, 3, 2, 1] and len(calls) == calibrate.evaluations(4)
    assert calibrate.evaluations(90) == 91 + 46 + 24 + 13 + 7 + 4 + 3 + 1  # 90, 45, 23, 12, 6, 3, 2 whole, then 1


def test_cli_calibrate_writes_ranking_budgets_and_picture(checkpoint, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "cal"
    assert main(["calibrate", "--model", str(checkpoint), "--prompts", "2", "--length", "150", "--stream", "8",
                 "--sinks", "1", "--states", "10", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "4 kv heads ranked in" in said and "budgets for a mean of 10 states" in said
    cal = read_calibration(out / "calibration.json")
    assert len(cal["ranking"]) == 4 and cal["seconds"] >= 0
    budgets = json.loads((out / "budgets.json").read_text())["budgets"]
    assert sum(map(sum, budgets)) == 40
    assert (out / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    policy = make_policy("tova", msrnn.policies.parse_states(str(out / "budgets.json")))  # any policy takes them
    assert policy.states == budgets
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", str(checkpoint), "--length", "10", "--out", str(out)])
