"""msrnn.hf: a msrnn policy inside a transformers model gives the logits of msrnn's own recurrence.

The oracle is msrnn's model on the same checkpoint (itself property-tested against transformers), for every built-in
policy, a prompt longer than the budget (so evictions happen inside the prompt and while stepping), batch 2 with
left-padded ragged prompts, and generate(). Qwen2, which msrnn does not load, is checked against an independent
oracle: transformers' own DynamicCache stepped token by token with eager attention, evicted after every step by a
few lines below that apply the policy's priorities directly."""
import tempfile

import pytest
import torch

import msrnn
from msrnn.errors import InputError
from msrnn.policies import POLICIES, layer_budgets, make_policy
from tiny import cache_policies, hf_model, save

POLICY_NAMES = cache_policies()  # the policies a transformers cache can run

hf_bridge = pytest.importorskip("msrnn.hf")
PolicyCache = hf_bridge.PolicyCache

TOL = 1e-5  # fp32; the same operations in the same order except projections/MLP (transformers' own layers)
K = 6  # the budget: prompts below are longer, so every policy evicts inside the prompt
NAMES = ["full", *POLICY_NAMES]


def pair(model_type, **overrides):
    """A tiny random transformers model running the "msrnn" attention, and msrnn's model of the same weights."""
    hf = hf_model(model_type, seed=3, **overrides)
    with tempfile.TemporaryDirectory() as d:
        model = msrnn.load_model(save(hf, d))
    hf.set_attn_implementation(hf_bridge.ATTENTION)
    return hf, model


@pytest.fixture(scope="module")
def llama():
    return pair("llama")


@pytest.fixture(scope="module")
def mistral():  # a sliding window shorter than the stream: visibility by position, not by slot
    return pair("mistral", sliding_window=9)


def tokens(B, T, seed=0):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def run_hf(hf, cache, ids, split, mask=None):
    """Prompt ids[:, :split] in one call, then one token per call; logits (B, T, V). Positions as generate() makes
    them: from the attention mask, so a left-padded row starts at 0."""
    mask = torch.ones_like(ids) if mask is None else mask
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = []
    with torch.no_grad():
        for a, b in [(0, split), *((t, t + 1) for t in range(split, ids.shape[1]))]:
            out.append(hf(ids[:, a:b], attention_mask=mask[:, :b], position_ids=position_ids[:, a:b],
                          cache=cache).logits)
    return torch.cat(out, dim=1)


def run_msrnn(model, ids, split, policy, mode="exact"):
    """msrnn: prefill ids[:, :split] (all logits), then step token by token: logits (B, T, V) and the state."""
    logits, state = model.prefill(ids[:, :split], policy=policy, mode=mode, all_logits=True)
    out = [logits]
    for t in range(split, ids.shape[1]):
        step, state = model.step(ids[:, t], state, policy)
        out.append(step[:, None])
    return torch.cat(out, dim=1), state


def prompt_split(policy, split):
    """A policy that is not layer_local (snapkv) cannot take an exact multi-token prompt in one call: one per call."""
    return split if policy is None or policy.layer_local else 1


def held(layer_positions):
    """(B, Hkv, n) positions -> per row and head the sorted list of positions held (holes dropped)."""
    return [[sorted(p for p in head.tolist() if p >= 0) for head in row] for row in layer_positions]


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_every_policy_equals_msrnn(model_type, request):
    hf, model = request.getfixturevalue(model_type)
    ids = tokens(2, 16)
    for name in NAMES:
        policy = make_policy(name, K)
        split = prompt_split(policy, 10)
        ours, state = run_msrnn(model, ids, split, policy)
        cache = PolicyCache(policy)
        theirs = run_hf(hf, cache, ids, split)
        assert (theirs - ours).abs().max() <= TOL, name
        if policy is not None:  # every layer within its own budget (PyramidKV's differ per layer)
            assert all(n <= k for n, k in zip(cache.sizes, layer_budgets(policy, len(cache.layers)))), name
        for layer, mine in zip(cache.layers, state.layers):  # the same states kept, by position
            assert held(layer.positions) == held(mine.pos[:, :, : mine.size]), name


def test_fast_prefill_equals_msrnn(llama):
    hf, model = llama
    ids = tokens(1, 20, seed=1)
    for name in ("tova", "h2o", "sinks", "snapkv"):
        policy = make_policy(name, K)
        ours, _ = run_msrnn(model, ids, 15, policy, mode="fast")
        theirs = run_hf(hf, PolicyCache(policy, prefill="fast"), ids, 15)
        assert (theirs - ours).abs().max() <= TOL, name
    exact = run_hf(hf, PolicyCache(make_policy("tova", K)), ids, 15)
    assert (exact - run_hf(hf, PolicyCache(make_policy("tova", K), prefill="fast"), ids, 15)).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_ragged_batch_rows_equal_each_row_alone(model_type, request):
    """Batch 2, left padding: every real token's logits equal msrnn on that row alone; padding never enters the
    state and never scores (H2O, tova-decay) or evicts."""
    hf, model = request.getfixturevalue(model_type)
    lengths, extra = (7, 10), 4
    rows = [tokens(1, n + extra, seed=10 + n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.stack([torch.cat([torch.zeros(width - n, dtype=torch.long), r]) for n, r in zip(lengths, rows)])
    mask = torch.stack([torch.cat([torch.zeros(width - n, dtype=torch.long), torch.ones(n + extra, dtype=torch.long)])
                        for n in lengths])
    for name in NAMES:
        policy = make_policy(name, K)
        cache = PolicyCache(policy)
        theirs = run_hf(hf, cache, ids, prompt_split(policy, width), mask)
        for b, (n, row) in enumerate(zip(lengths, rows)):
            ours, _ = run_msrnn(model, row[None], n, policy)
            assert (theirs[b, width - n :] - ours[0]).abs().max() <= TOL, (name, b)
        if policy is not None:
            assert all(n <= k for n, k in zip(cache.sizes, layer_budgets(policy, len(cache.layers)))), name


def test_generate_same_greedy_tokens(llama):
    hf, model = llama
    prompts = [tokens(1, 11, seed=5)[0], tokens(1, 7, seed=6)[0]]
    width, new = 11, 8
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    for name in ("tova", "h2o", "window", "tova-decay"):
        policy = make_policy(name, K)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, cache=PolicyCache(policy), max_new_tokens=new,
                              do_sample=False, pad_token_id=0)
        for b, p in enumerate(prompts):
            logits, state = model.prefill(p[None], policy=policy)
            mine = []
            for _ in range(new):
                mine.append(int(logits.argmax(-1)))
                logits, state = model.step(torch.tensor([mine[-1]]), state, policy)
            assert out[b, width:].tolist() == mine, (name, b)


def test_beam_search_reorders_the_rows(llama):
    """Unbounded through the bridge, beam search (reorder_cache every step) picks transformers' own beams."""
    hf, _ = llama
    ids = tokens(2, 9, seed=9)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours = hf.generate(ids, cache=PolicyCache(None), **kwargs)
        hf.set_attn_implementation("eager")
        theirs = hf.generate(ids, **kwargs)
        hf.set_attn_implementation(hf_bridge.ATTENTION)
    assert torch.equal(ours, theirs)


# --- Qwen2 (msrnn does not load it): against transformers' DynamicCache evicted by the policy, token by token ----
ORACLE = "msrnn-test-eager"  # the model's own eager attention, without transformers' mask (see policy_scan)
QUERIES = {}  # layer index -> (B, H, hd) the newest query the oracle's attention was given (expected-attention)


def eager_unmasked(module, query, key, value, attention_mask, **kwargs):
    """The model's own `eager_attention_forward` (from its modeling file), every held state visible. The oracle
    feeds one unpadded token per call, for which that is the mask; transformers' own mask has one length for every
    layer (layer 0's), which is wrong when the layers hold different numbers of states (PyramidKV)."""
    import sys

    QUERIES[module.layer_idx] = query[:, :, -1]
    return sys.modules[type(module).__module__].eager_attention_forward(module, query, key, value, None, **kwargs)


def policy_scan(hf, ids, policy):
    """transformers, eager attention, one token per call with its own DynamicCache; after every step each layer
    drops, per row and kv head, its lowest-priority state (the oldest of equals) when over budget, and every -inf
    state then. An independent re-implementation of msrnn's eviction rule for the oracle."""
    from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache

    AttentionInterface.register(ORACLE, eager_unmasked)
    AttentionMaskInterface.register(ORACLE, lambda *args, **kwargs: None)
    hf.set_attn_implementation(ORACLE)
    (B, T), Hkv = ids.shape, hf.config.num_key_value_heads
    cache, out = DynamicCache(config=hf.config), []
    pos = score = None
    for t in range(T):
        with torch.no_grad():
            res = hf(ids[:, t : t + 1], position_ids=torch.full((B, 1), t), cache=cache,
                     output_attentions=True)
        out.append(res.logits[:, -1])
        if pos is None:
            pos = [torch.empty(B, Hkv, 0, dtype=torch.long) for _ in cache.layers]
            score = [torch.empty(B, Hkv, 0) for _ in cache.layers]
        for i, layer in enumerate(cache.layers):
            p = policy.at_layer(i, len(cache.layers))  # this layer's budget (PyramidKV's differ per layer)
            attn = res.attentions[i][:, :, -1]  # (B, H, n) the newest query's attention
            pos[i] = torch.cat([pos[i], torch.full((B, Hkv, 1), t)], dim=-1)
            score[i] = torch.cat([score[i], torch.zeros(B, Hkv, 1)], dim=-1)
            score[i] = p.update(score[i], attn[:, :, None]).expand_as(score[i]).clone()
            extra = {"keys": layer.keys} if p.needs_keys else {}  # KeyDiff reads the (rotated) keys held
            if p.needs_value_norms:  # tova-value weighs attention by the values held: recomputed here every step
                extra["value_norms"] = layer.values.float().abs().sum(dim=-1)  # (B, Hkv, n) |v_j|_1 per kv head
            if p.needs_values:
                extra["values"] = layer.values
            if p.needs_queries:  # the newest (rotated) query, and the model's own RoPE frequencies
                extra["queries"], extra["inv_freq"] = QUERIES[i], hf.model.rotary_emb.inv_freq
            prio = p.priority(attn if p.needs_attention else None, pos[i], score[i], **extra).expand_as(score[i])
            n = prio.shape[-1]
            if n > p.states:
                if bool((prio == float("-inf")).all()):  # the baseline: everything goes
                    keep = torch.zeros(B, prio.shape[1], 0, dtype=torch.long)
                else:  # drop the lowest; of equals the oldest (stable sort by position, then by priority)
                    order = prio.argsort(dim=-1, stable=True)[..., 1:]
                    keep = order.sort(dim=-1).values
                gather = keep[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
                layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)
                pos[i], score[i] = pos[i].gather(2, keep), score[i].gather(2, keep)
    hf.set_attn_implementation(hf_bridge.ATTENTION)
    return torch.stack(out, dim=1)


@pytest.fixture(scope="module")
def qwen2():
    hf = hf_model("qwen2", seed=4)  # q/k/v biases: the part of Qwen2 that differs from Llama
    hf.set_attn_implementation(hf_bridge.ATTENTION)
    return hf


def test_qwen2_every_policy_equals_token_by_token_oracle(qwen2):
    ids = tokens(2, 13, seed=7)
    for name in POLICY_NAMES:
        policy = make_policy(name, K)
        ours = run_hf(qwen2, PolicyCache(policy), ids, prompt_split(policy, 9))
        assert (ours - policy_scan(qwen2, ids, policy)).abs().max() <= TOL, name


@pytest.mark.parametrize("budgets", [[9, 5], [5, 9]])  # the bigger layer first, and last
def test_qwen2_budgets_per_layer_equal_the_oracle(qwen2, budgets):
    """Layers of different lengths: the bridge decides visibility from each layer's own positions, never from
    transformers' mask (one length for all layers), so ragged layers are exact too, prompt and steps."""
    ids = tokens(2, 14, seed=11)
    for name in ("tova", "h2o", "sinks", "keydiff", "tova-value"):
        policy = make_policy(name, budgets)
        cache = PolicyCache(policy)
        ours = run_hf(qwen2, cache, ids, 10)
        assert cache.sizes == budgets, name
        assert (ours - policy_scan(qwen2, ids, policy)).abs().max() <= TOL, name
    pyramid = make_policy("pyramidkv(window=2)", K)  # SnapKV in every layer, budgets 9 and 3 (mean 6)
    cache = PolicyCache(pyramid)
    ours = run_hf(qwen2, cache, ids, 1)
    assert cache.sizes == layer_budgets(pyramid, 2) == [9, 3]
    assert (ours - policy_scan(qwen2, ids, pyramid)).abs().max() <= TOL
    policy, prompt = make_policy("tova", budgets), ids[:, :10]  # generate(): every new token the oracle's argmax
    with torch.no_grad():
        out = qwen2.generate(prompt, attention_mask=torch.ones_like(prompt), cache=PolicyCache(policy),
                             max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(policy_scan(qwen2, out, policy)[:, 9:-1].argmax(-1), out[:, 10:])


def test_qwen2_budget_above_length_is_full_attention(qwen2):
    ids = tokens(2, 15, seed=8)
    qwen2.set_attn_implementation("eager")
    with torch.no_grad():
        full = qwen2(ids).logits
    qwen2.set_attn_implementation(hf_bridge.ATTENTION)
    for name in ("tova", "h2o", "sinks"):
        assert (run_hf(qwen2, PolicyCache(make_policy(name, 15)), ids, 8) - full).abs().max() <= TOL, name


# --- on a GPU: the same answers, every state on the device -------------------------------------------------------
CUDA_TOL = 1e-4  # fp32 on both, but the GPU's kernels sum in another order (no TF32: torch's default for matmul)
ON_DEVICE = [("tova", K, "exact"), ("tova-decay", K, "exact"), ("window", K, "exact"), ("keydiff", K, "exact"),
             ("tova-value", K, "exact"), ("snapkv", K, "fast"), ("h2o", [9, 5], "exact"), ("pyramidkv", K, "fast")]


def same_answers_on(device, hf, cases=ON_DEVICE, lengths=(7, 10), extra=4, new=5):
    """A ragged left-padded batch through PolicyCache on `device` (a copy of `hf` moved there) gives the logits
    and greedy generate() tokens of the CPU model, and every tensor of every layer's state lives on `device`."""
    import copy

    on = copy.deepcopy(hf).to(device)
    width = max(lengths)
    ids = torch.stack([torch.cat([torch.zeros(width - n, dtype=torch.long), tokens(1, n + extra, seed=20 + n)[0]])
                       for n in lengths])
    mask = (torch.arange(width + extra)[None] >= torch.tensor([width - n for n in lengths])[:, None]).long()
    for name, k, prefill in cases:
        policy = make_policy(name, k)
        split = prompt_split(policy, width) if prefill == "exact" else width
        cpu = run_hf(hf, PolicyCache(policy, prefill), ids, split, mask)
        cache = PolicyCache(policy, prefill)
        there = run_hf(on, cache, ids.to(device), split, mask.to(device))
        assert there.device.type == torch.device(device).type
        assert (there.cpu() - cpu).abs().max() <= CUDA_TOL, name
        assert cache.sizes == layer_budgets(policy, len(cache.layers)), name
        for layer in cache.layers:
            s = layer.state
            assert {t.device.type for t in (s.keys, s.values, s.pos, s.score)} == {torch.device(device).type}, name
        kwargs = dict(max_new_tokens=new, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            want = hf.generate(ids[:, :width], attention_mask=mask[:, :width], cache=PolicyCache(policy, prefill),
                               **kwargs)
            got = on.generate(ids[:, :width].to(device), attention_mask=mask[:, :width].to(device),
                              cache=PolicyCache(policy, prefill), **kwargs)
        assert torch.equal(got.cpu(), want), name


def test_rows_selected_and_repeated_keep_their_states(llama):
    """generate()'s row bookkeeping (batch_select_indices, batch_repeat_interleave), with an index tensor."""
    hf, _ = llama
    cache = PolicyCache(make_policy("tova", K))
    run_hf(hf, cache, tokens(2, 9, seed=3), 9)
    before = [held(layer.positions) for layer in cache.layers]
    cache.batch_repeat_interleave(2)
    assert [held(layer.positions) for layer in cache.layers] == [[r[0], r[0], r[1], r[1]] for r in before]
    cache.batch_select_indices(torch.tensor([2]))
    assert [held(layer.positions) for layer in cache.layers] == [[r[1]] for r in before]


def test_same_answers_helper_runs_on_cpu(llama):
    """The GPU check's own code, run where the suite runs (a copy on the CPU), so it is known to work."""
    same_answers_on("cpu", llama[0], ON_DEVICE[-2:], lengths=(5, 8), extra=2, new=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_policy_cache_and_generate_equal_cpu(llama):
    same_answers_on("cuda", llama[0])


# --- how it runs, and misuse -------------------------------------------------------------------------------------
def test_policies_without_attention_never_materialise_probabilities(llama, monkeypatch):
    hf, _ = llama
    import msrnn.attention

    calls = []
    real = msrnn.attention.attention_probs
    monkeypatch.setattr(msrnn.attention, "attention_probs", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = tokens(1, 12)
    run_hf(hf, PolicyCache(make_policy("window", 16)), ids, 6)
    run_hf(hf, PolicyCache(None), ids, 6)
    assert not calls  # the fused kernel
    run_hf(hf, PolicyCache(make_policy("tova", 16)), ids, 6)
    assert calls


def test_misuse_is_one_clear_error(llama):
    hf, _ = llama
    ids = tokens(1, 5)
    hf.set_attn_implementation("eager")
    with pytest.raises(InputError, match="attn_implementation"):
        hf(ids, cache=PolicyCache(make_policy("tova", K)))
    hf.set_attn_implementation(hf_bridge.ATTENTION)
    with pytest.raises(InputError, match="PolicyCache"):
        hf(ids, use_cache=False)
    with pytest.raises(InputError, match="absolute"):
        PolicyCache(make_policy("sinks", K, positions="shift"))
    with pytest.raises(InputError, match="Policy"):
        PolicyCache("tova")
    with pytest.raises(InputError, match="prefill"):
        PolicyCache(None, prefill="slow")
    cache = PolicyCache(make_policy("tova", K))
    hf(ids, cache=cache)
    with pytest.raises(InputError, match="2D attention mask"):
        hf(ids, attention_mask=torch.ones(1, 1, 5, 5, dtype=torch.bool), cache=PolicyCache(make_policy("tova", K)))
    with pytest.raises(InputError, match="layer_local"):
        hf(ids, cache=PolicyCache(make_policy("snapkv", 2)))
    with pytest.raises(InputError, match="cropped"):
        cache.crop(-1)
    assert hf(ids, cache=PolicyCache(make_policy("tova", K))).logits.isfinite().all()  # a clean state afterwards


# --- msrnn eval ppl --backend transformers: the same table -------------------------------------------------------
def test_eval_ppl_backends_give_the_same_table(tmp_path, capsys):
    import json
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers

    from msrnn.cli import main

    words = [f"w{i}" for i in range(96)]  # + [UNK] = the tiny model's 97 ids
    save(hf_model("llama", seed=3, max_position_embeddings=64), tmp_path / "tiny")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tiny" / "tokenizer.json"))
    rng = random.Random(0)
    (tmp_path / "story.txt").write_text(" ".join(rng.choice(words[:40]) for _ in range(200)))
    for prefill in ("exact", "fast"):
        cells = {}
        for backend in ("msrnn", "transformers"):
            out = tmp_path / f"{backend}-{prefill}"
            assert main(["eval", "ppl", "--text", str(tmp_path / "story.txt"), "--model", str(tmp_path / "tiny"),
                         "--policies", "full,window,sinks,h2o,tova,tova-decay", "--states", "6,12", "--context", "24",
                         "--chunks", "3", "--batch", "2", "--prefill", prefill, "--backend", backend,
                         "--out", str(out)]) == 0
            cells[backend] = json.loads((out / "results.json").read_text())["cells"]
        capsys.readouterr()
        assert len(cells["msrnn"]) == len(cells["transformers"]) == 11
        for ours, theirs in zip(cells["msrnn"], cells["transformers"]):
            assert (ours["policy"], ours["states"]) == (theirs["policy"], theirs["states"])
            assert ours["ppl"] == pytest.approx(theirs["ppl"], rel=1e-5), (prefill, ours["policy"], ours["states"])
            assert ours["top1_agreement"] == theirs["top1_agreement"]
            assert ours["kl"] == pytest.approx(theirs["kl"], abs=1e-5)
