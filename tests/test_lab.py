"""The policy lab: TOVA with memory (tova-decay, tova-max), tova-sink, tova-recent, and bring-your-own policy files.

Each score update is checked by hand on small tensors; gamma = 0 is TOVA exactly on a model; a policy class loaded
from a file runs through `msrnn eval ppl` like a built-in one; bad files and classes are clear errors."""
from pathlib import Path

import pytest
import torch

import msrnn
import msrnn.eval as ev
from msrnn.cli import main
from msrnn.errors import InputError
from msrnn.state import l1_norms
from msrnn.policies import INF, TOVA, TOVADecay, TOVAMax, TOVARecent, TOVASink, make_policy, policy_class
from tiny import hf_model, save

ATTN = torch.tensor([[[[0.2, 0.3, 0.5]], [[0.4, 0.1, 0.5]]]])  # (B=1, H=2, T=1, n=3): head mean 0.3, 0.2, 0.5
POS = torch.tensor([[[0, 1, 2]]])  # (B, Hkv=1, n)


def test_tova_decay_update_and_bias_correction_by_hand():
    p = TOVADecay(2, gamma=0.5)
    s = p.update(torch.tensor([[[0.5, 0.2, 0.0]]]), ATTN)
    torch.testing.assert_close(s, torch.tensor([[[0.4, 0.2, 0.25]]]))  # 0.5*old + 0.5*mean(attn)
    prio = p.priority(ATTN[:, :, -1], POS, s)  # ages 3, 2, 1 -> divide by 1 - 0.5**age = 0.875, 0.75, 0.5
    torch.testing.assert_close(prio, torch.tensor([[[0.4 / 0.875, 0.2 / 0.75, 0.5]]]))


def test_tova_decay_update_of_T_queries_equals_T_single_updates():
    p, score = TOVADecay(4, gamma=0.7), torch.rand(2, 1, 5)
    attn = torch.rand(2, 3, 4, 5).softmax(-1)  # (B, H, T=4, n)
    one_by_one = score
    for t in range(4):
        one_by_one = p.update(one_by_one, attn[:, :, t : t + 1])
    torch.testing.assert_close(p.update(score, attn), one_by_one)


def test_tova_max_update_by_hand():
    p = TOVAMax(2, gamma=0.5)
    s = p.update(torch.tensor([[[0.8, 0.2, 0.0]]]), ATTN)
    torch.testing.assert_close(s, torch.tensor([[[0.4, 0.2, 0.5]]]))  # max(0.5*old, mean(attn))
    assert torch.equal(p.priority(ATTN[:, :, -1], POS, s), s)


def test_sink_and_recent_variants_protect_what_they_say():
    attn = ATTN[:, :, -1]  # (1, 2, 3)
    torch.testing.assert_close(TOVASink(2).priority(attn, POS, None), torch.tensor([[[INF, 0.2, 0.5]]]))
    torch.testing.assert_close(TOVARecent(2, recent=1).priority(attn, POS, None), torch.tensor([[[0.3, 0.2, INF]]]))
    assert TOVARecent(16).recent == 2  # default k // 8
    with pytest.raises(InputError, match="gamma"):
        TOVADecay(8, gamma=1.0)
    with pytest.raises(InputError, match="sink"):
        TOVASink(1, sinks=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return msrnn.load_model(save(hf_model(seed=5), tmp_path_factory.mktemp("lab")))


def run(model, policy, tokens, mode="exact"):
    state = model.init_state(1, policy)
    logits, state = model.prefill(tokens[None, :12], state, policy, mode=mode)
    out = [logits]
    for t in tokens[12:]:
        logits, state = model.step(t[None], state, policy)
        out.append(logits)
    return torch.cat(out), state


@pytest.mark.parametrize("cls", [TOVADecay, TOVAMax])
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_gamma_zero_is_tova_exactly(model, cls, mode):
    tokens = torch.randint(0, 97, (60,), generator=torch.Generator().manual_seed(1))
    ref, ref_state = run(model, TOVA(6), tokens, mode)
    out, state = run(model, cls(6, gamma=0.0), tokens, mode)
    assert torch.equal(out, ref)  # bit for bit: the same states kept at every step
    assert all(torch.equal(a.pos, b.pos) for a, b in zip(state.layers, ref_state.layers))
    other, _ = run(model, cls(6, gamma=0.9), tokens, mode)
    assert not torch.equal(other, ref)  # and gamma matters


def test_two_gammas_in_one_eval_batch_equal_each_alone(model):
    """eval shares the unevicting prefix between members: members with other settings must not share a score."""
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(2))
    policies = [TOVADecay(6, gamma=0.5), TOVADecay(6, gamma=0.95), TOVAMax(8, gamma=0.9)]
    together = ev.score(model, tokens, policies)
    for p, s in zip(policies, together):
        alone = ev.score(model, tokens, [p])[0]
        torch.testing.assert_close(s.loss, alone.loss, atol=1e-5, rtol=1e-5)  # batching changes float sums only


USER_POLICY = '''
from msrnn.policies import Policy

class Oldest(Policy):
    """Keep the oldest states: the opposite of a window."""
    name = "oldest"
    needs_attention = False

    def priority(self, attn, pos, score):
        return -pos.float()

class MyTOVA(Policy):
    def priority(self, attn, pos, score):
        return attn.mean(dim=1, keepdim=True)

NOT_A_POLICY = 3
'''


def test_a_policy_file_runs_through_eval_like_a_builtin(tmp_path, model):
    (tmp_path / "mine.py").write_text(USER_POLICY)
    spec = f"{tmp_path / 'mine.py'}:MyTOVA"
    assert policy_class(spec).__name__ == "MyTOVA"
    tokens = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(3))
    mine, builtin = ev.score(model, tokens, [make_policy(spec, 6), make_policy("tova", 6)])
    assert torch.equal(mine.loss, builtin.loss)


def test_msrnn_eval_ppl_with_a_policy_file(tmp_path):
    from test_eval import WORDS  # the tiny word-level checkpoint of test_eval
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory = tmp_path / "ckpt"
    save(hf_model(seed=3, max_position_embeddings=64), directory)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (tmp_path / "story.txt").write_text(" ".join(WORDS[i % 40] for i in range(0, 700, 7)))
    (tmp_path / "mine.py").write_text(USER_POLICY)
    out = tmp_path / "out"
    main(["eval", "ppl", "--model", str(directory), "--text", str(tmp_path / "story.txt"), "--policies",
          f"full,tova,tova-decay,tova-max(gamma=0.5),{tmp_path / 'mine.py'}:Oldest", "--states", "8,16", "--context", "40",
          "--chunks", "2", "--out", str(out)])
    table = (out / "table.md").read_text()
    assert "mine.py:Oldest" in table and "tova-decay" in table and "tova-max(gamma=0.5)" in table


def test_settings_in_a_policy_name():
    p = make_policy("tova-decay(gamma=0.8)", 16)
    assert isinstance(p, TOVADecay) and p.gamma == 0.8 and p.states == 16
    assert make_policy(" tova-recent( recent=3 ) ", 16).recent == 3
    for bad, message in [("tova-decay(gamma)", "not key=value"), ("tova-decay(gamma=x)", "not key=value"),
                         ("tova-decay(gamma=0.8", "parentheses"), ("tova(gamma=0.5)", "does not take")]:
        with pytest.raises(InputError, match=message):
            make_policy(bad, 16)


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown policy 'nope'"),
    ("missing.py:X", "does not exist"),
    ("{dir}/mine.py:Absent", "has no 'Absent'; the Policy classes it defines: Oldest, MyTOVA"),
    ("{dir}/mine.py:NOT_A_POLICY", "not a msrnn.policies.Policy subclass"),
    ("{dir}/broken.py:X", "failed to run: SyntaxError"),
])
def test_bad_policy_specs_are_clear_errors(tmp_path, spec, message, capsys):
    (tmp_path / "mine.py").write_text(USER_POLICY)
    (tmp_path / "broken.py").write_text("class X(:\n")
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(".", r"\.")):
        make_policy(spec.format(dir=tmp_path), 8)


CANDIDATES = Path(__file__).resolve().parents[1] / "docs/results/lab/candidates.py"


def test_the_second_round_candidates_by_hand_and_on_a_model(model):
    """docs/results/lab/candidates.py: the variants of section 3 of the lab's README, loaded as a user's file."""
    head_max, q_max, recent = (policy_class(f"{CANDIDATES}:{n}") for n in ("DecayHeadMax", "DecayQMax", "DecayRecent"))
    p = head_max(2, gamma=0.5)  # two kv heads, one query head each: a per-head average, then the max over heads
    s = p.update(torch.tensor([[[0.8, 0.2, 0.0], [0.0, 0.4, 0.2]]]), ATTN)
    torch.testing.assert_close(s, torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.25, 0.35]]]))
    prio = p.priority(ATTN[:, :, -1], POS.expand(1, 2, 3), s)  # bias-corrected (0.875, 0.75, 0.5), max over heads
    torch.testing.assert_close(prio, torch.tensor([[[0.5 / 0.875, 0.25 / 0.75, 0.7]]]))
    p = q_max(2, gamma=0.5)  # the max over query heads of the attention is (0.4, 0.3, 0.5)
    s = p.update(torch.tensor([[[0.8, 0.2, 0.0]]]), ATTN)
    torch.testing.assert_close(s, torch.tensor([[[0.6, 0.25, 0.25]]]))
    prio = recent(8, gamma=0.5).priority(None, POS, torch.tensor([[[0.4, 0.2, 0.25]]]))  # k // 8 = 1 newest kept
    torch.testing.assert_close(prio, torch.tensor([[[0.4 / 0.875, 0.2 / 0.75, INF]]]))
    tokens = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(4))
    full, _ = run(model, None, tokens)
    for cls in (head_max, q_max, recent):
        logits, state = run(model, cls(30), tokens)  # a budget the 30 tokens never reach: the full model
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
        logits, state = run(model, cls(6), tokens)
        assert state.size == 6 and logits.isfinite().all()
        assert not torch.allclose(logits, full, atol=1e-3)  # and evicting changes the predictions


# --- round 3 (docs/results/lab/README.md): policies that read the states' values ------------------------------------
VALUES = torch.tensor([[[[1.0, -1.0], [0.5, 0.5], [2.0, 0.0]],
                        [[3.0, 1.0], [0.0, 1.0], [0.0, -2.0]]]])  # (B=1, Hkv=2, n=3, hd=2): L1 norms 2, 1, 2 and 4, 1, 2
NORMS = torch.tensor([[[2.0, 1.0, 2.0], [4.0, 1.0, 2.0]]])  # (B, Hkv, n) what the state keeps for VALUES


def test_tova_value_priority_by_hand():
    s = torch.tensor([[[0.4, 0.2, 0.25]]])  # tova-decay's average; gamma 0.5 divides by 0.875, 0.75, 0.5
    pos = POS.expand(1, 2, 3)
    p = make_policy("tova-value(gamma=0.5, sinks=0)", 2)
    assert p.needs_value_norms and p.keeps_score and not p.needs_values
    prio = p.priority(ATTN[:, :, -1], pos, s, value_norms=NORMS)  # times the kv-head mean of |v|_1: 3, 1, 2
    torch.testing.assert_close(prio, torch.tensor([[[0.4 / 0.875 * 3, 0.2 / 0.75 * 1, 0.25 / 0.5 * 2]]]))
    prio = make_policy("tova-value(gamma=0.5)", 2).priority(ATTN[:, :, -1], pos, s, value_norms=NORMS)  # 1 sink: kept
    torch.testing.assert_close(prio, torch.tensor([[[INF, 0.2 / 0.75 * 1, 0.25 / 0.5 * 2]]]))
    with pytest.raises(InputError, match="sinks"):
        make_policy("tova-value(sinks=4)", 4)


class ValueSpy(TOVA):
    """TOVA that checks, at every call, that `values` is the layer's value buffer, as many slots as positions."""

    needs_values = True
    seen = 0

    def priority(self, attn, pos, score, values=None):
        assert values.shape[:3] == pos.shape and values.shape[3] == 8, values.shape  # (B, Hkv, n, hd): hd 8
        ValueSpy.seen += 1
        return super().priority(attn, pos, score)


def test_values_reach_a_policy_that_asks_and_only_it(model):
    """Exact prefill (the layer-major scan), fast prefill and single steps all pass `values=`; a policy that does not
    ask is called with three arguments (TOVA's own priority would fail on a fourth), also inside a batch of rows."""
    tokens = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(5))
    for mode in ("exact", "fast"):
        ValueSpy.seen = 0
        spied, _ = run(model, ValueSpy(6), tokens, mode)
        assert ValueSpy.seen > 0
        assert torch.equal(spied, run(model, TOVA(6), tokens, mode)[0])  # reading values changes nothing
    rows = ev.score(model, tokens[None], [ValueSpy(6), TOVA(6), make_policy("tova-value", 8)])
    assert torch.equal(rows[0].loss, rows[1].loss)


def test_tova_value_exact_prefill_equals_steps_and_batching(model):
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(6))
    p = make_policy("tova-value", 6)
    state = model.init_state(2, p)
    stepped = torch.stack([model.step(t, state, p)[0] for t in tokens.T], 1)  # (B, T, V) one token at a time
    state = model.init_state(2, p)
    scanned, _ = model.prefill(tokens, state, p, mode="exact", all_logits=True)
    torch.testing.assert_close(scanned, stepped, atol=1e-5, rtol=1e-5)  # layer-major vs token-major float sums
    tova = ev.score(model, tokens, [make_policy("tova-decay", 6)])[0]
    together = ev.score(model, tokens, [make_policy("tova-decay", 6), p])
    alone = ev.score(model, tokens, [p])[0]
    torch.testing.assert_close(together[1].loss, alone.loss, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone.loss, tova.loss)  # the value norm changes which states stay


class TOVAValueFromValues(TOVADecay):
    """tova-value as it was first written: the value norms recomputed from all held values at every step (through
    `needs_values`), out-of-place ops, the bias correction by indexing. The state-kept norms must change nothing."""

    needs_values = True

    def priority(self, attn, pos, score, values=None):
        p1 = pos[:, :1]
        age = (p1.max(dim=-1, keepdim=True).values - p1).clamp_max_(len(self.correction) - 1)
        prio = score[:, :1] / self.correction[age] * values.float().abs().sum(dim=-1).mean(dim=1, keepdim=True)
        return prio.masked_fill(p1 < 1, INF)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_tova_value_with_kept_norms_is_bit_for_bit_the_recomputed_one(model, mode):
    """The state computes a value's norm once, when it enters, and moves it with its slot (LayerState.value_norms);
    the decisions, logits and states are exactly those of recomputing every norm at every step, in steps (ring_step),
    the layer-major scan and a fast prefill, alone and in a batch of rows."""
    tokens = torch.randint(0, 97, (60,), generator=torch.Generator().manual_seed(8))
    ref, ref_state = run(model, TOVAValueFromValues(6), tokens, mode)
    out, state = run(model, make_policy("tova-value", 6), tokens, mode)
    assert torch.equal(out, ref)
    for a, b in zip(state.layers, ref_state.layers):
        assert torch.equal(a.pos, b.pos) and torch.equal(a.score, b.score)
        assert b.norms is None and torch.equal(a.norms[:, :, : a.size], l1_norms(a.values[:, :, : a.size]))
    rows = ev.score(model, torch.stack([tokens, tokens.flip(0)]), [TOVAValueFromValues(6), make_policy("tova-value", 6),
                                                                    TOVA(6)])
    assert torch.equal(rows[0].loss, rows[1].loss) and not torch.equal(rows[1].loss, rows[2].loss)


def test_value_norms_travel_with_their_slots():
    """Whatever moves slots (append, growing, sorting, drop_lowest + compact, keep_top, replace_lowest, copy), the kept
    norms stay those of the values in the same slots, bit for bit; and the hand-checked NORMS are VALUES' norms."""
    assert torch.equal(l1_norms(VALUES), NORMS)
    gen = torch.Generator().manual_seed(9)
    layer = msrnn.State.empty(1, 2, 3, 4, 3, torch.float32).layers[0]  # B 2, Hkv 3, hd 4, 3 slots: grows
    new = lambda T: (torch.randn(2, 3, T, 4, generator=gen), torch.randn(2, 3, T, 4, generator=gen))  # noqa: E731
    layer.append(*new(2), torch.tensor([[0, 1], [0, 1]]))
    assert layer.norms is None  # kept only once a policy asks
    layer.value_norms()
    nxt = 2

    def check():
        n = layer.size
        assert torch.equal(layer.norms[:, :, :n], l1_norms(layer.values[:, :, :n]))

    for step in range(12):
        T = 3 if step % 4 == 0 else 1
        layer.sort_by_position() if step % 3 == 0 else None
        layer.append(*new(T), torch.arange(nxt, nxt + T).expand(2, T))
        nxt += T
        check()
        prio = torch.rand(2, 3, layer.size, generator=gen)  # per kv head: the heads move different slots
        if step % 4 == 0:
            layer.keep_top(prio, 4)
            layer.compact()
        elif step % 2 and layer.size == 5 and not layer.maybe_empty:
            layer.replace_lowest(prio)
        else:
            layer.drop_lowest(prio, 4, layer.pos[:, :, : layer.size] == -1)
            layer.compact()
        check()
    copy = layer.copy()
    assert torch.equal(copy.norms, layer.norms) and copy.norms.data_ptr() != layer.norms.data_ptr()


def test_tova_decay_head_by_hand_and_gamma_zero_is_tova_head(model):
    p = make_policy("tova-decay-head(gamma=0.5)", 2)  # two kv heads, one query head each
    s = p.update(torch.tensor([[[0.8, 0.2, 0.0], [0.0, 0.4, 0.2]]]), ATTN)
    torch.testing.assert_close(s, torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.25, 0.35]]]))
    pos = torch.tensor([[[0, 1, 2], [0, 3, 2]]])  # the heads hold different states: ages 2, 1, 0 and 3, 0, 1
    prio = p.priority(ATTN[:, :, -1], pos, s)  # divided by 1 - 0.5 ** (age + 1)
    torch.testing.assert_close(prio, torch.tensor([[[0.5 / 0.875, 0.25 / 0.75, 0.25 / 0.5],
                                                    [0.2 / 0.9375, 0.25 / 0.5, 0.35 / 0.75]]]))
    tokens = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(7))
    ref, ref_state = run(model, make_policy("tova-head", 6), tokens)
    out, state = run(model, make_policy("tova-decay-head(gamma=0.0)", 6), tokens)
    assert torch.equal(out, ref)
    assert all(torch.equal(a.pos, b.pos) for a, b in zip(state.layers, ref_state.layers))
    assert any(not torch.equal(a.pos[:, 0], a.pos[:, 1]) for a in state.layers)  # kv heads keep different states


def test_tova_fit_by_hand():
    from msrnn.policies import TOVAFit

    p = TOVAFit(2, sinks=0)  # gamma 0.9: bias corrections 1 - 0.9 ** 3, 1 - 0.9 ** 2, 1 - 0.9 for ages 2, 1, 0
    s, pos = torch.tensor([[[0.4, 0.2, 0.25]]]), POS.expand(1, 2, 3)
    prio = p.priority(ATTN[:, :, -1], pos, s, value_norms=NORMS)
    a, size, age, c = [0.3, 0.2, 0.5], [3.0, 1.0, 2.0], [2.0, 1.0, 0.0], [0.271, 0.19, 0.1]
    eps, log = 1e-6, torch.log
    want = [p.W_NOW * log(torch.tensor(a[j] + eps)) + log(torch.tensor(s[0, 0, j].item() / c[j] + eps))
            + p.W_VALUE * log(torch.tensor(size[j] + eps)) + p.W_AGE * log(torch.tensor(1 + age[j])) for j in range(3)]
    torch.testing.assert_close(prio, torch.stack(want)[None, None])
    p.W_NOW, p.W_VALUE, p.W_AGE = 0.0, 1.0, 0.0  # then it is the log of tova-value's priority
    value = make_policy("tova-value(sinks=0)", 2).priority(ATTN[:, :, -1], pos, s, value_norms=NORMS)
    torch.testing.assert_close(p.priority(ATTN[:, :, -1], pos, s, value_norms=NORMS).exp(), value, rtol=1e-4, atol=0)
    assert TOVAFit(2).priority(ATTN[:, :, -1], pos, s, value_norms=NORMS)[0, 0, 0] == INF  # the first token stays
