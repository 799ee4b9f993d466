"""RowPolicies: rows of different policies and budgets in one batch, each row deciding as its policy alone would."""
import torch

from msrnn.batch import RowPolicies
from msrnn.policies import H2O, TOVA, make_policy


class MyTOVA(TOVA):
    name = "my-tova"


def test_rows_own_budgets_and_alike_built_ins_share_one_call():
    rows = RowPolicies([make_policy("tova", 4), make_policy("tova", 8), make_policy("h2o", 4), make_policy("h2o", 8),
                        MyTOVA(4), MyTOVA(8)], rows=2)
    assert rows.budget().flatten().tolist() == [4, 4, 8, 8, 4, 4, 8, 8, 4, 4, 8, 8] and rows.min_budget() == 4
    spans = [(type(m).__name__, a, b) for m, a, b in rows.blocks]
    # TOVA's priority does not read the budget: one call for both; H2O's recent window does (k // 2): two calls;
    # a user's class is never merged (msrnn cannot know whether its priority reads the budget)
    assert spans == [("TOVA", 0, 4), ("H2O", 4, 6), ("H2O", 6, 8), ("MyTOVA", 8, 10), ("MyTOVA", 10, 12)]
    assert rows.keeps_score and rows.needs_attention and rows.layer_local


def test_priorities_are_each_members_own():
    members = [make_policy("window", 3), make_policy("tova", 3), H2O(4)]
    rows = RowPolicies(members, rows=1)
    attn = torch.softmax(torch.randn(3, 4, 6), -1)  # (R=3, H=4, n=6)
    pos = torch.arange(6).expand(3, 2, 6).clone()  # (R, Hkv=2, n)
    score = torch.rand(3, 2, 6)
    got = rows.priority(attn, pos, score)
    for i, m in enumerate(members):
        expected = m.priority(attn[i : i + 1], pos[i : i + 1], score[i : i + 1]).expand(1, 2, 6)
        assert torch.equal(got[i : i + 1], expected)
    updated = rows.update(score, attn[:, :, None])  # only H2O keeps a score: the other rows are unchanged
    assert torch.equal(updated[:2], score[:2]) and torch.equal(updated[2:], members[2].update(score[2:], attn[2:, :, None]))
