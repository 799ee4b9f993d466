"""int8/int4 weight-only layers (msrnn/quant.py) and dtype="int8" | "int4" | "auto" loading.

The int kernels are checked against the float matrices they stand for; GGUF blocks against the gguf package's own
dequantization; and every policy runs at every dtype on a tiny model, close to its fp32 reference."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import msrnn
from msrnn import quant
from msrnn.errors import CheckpointError, InputError
from msrnn.gguf import read_gguf
from msrnn.policies import POLICIES, make_policy
from test_gguf import write_gguf
from tiny import POLICY_NAMES, hf_model, save

BF16 = 2 ** -8  # bf16 keeps 8 significant bits: relative rounding error <= 2^-8 (kernel outputs, scales, zeros)


@pytest.mark.parametrize("n,k", [(64, 32), (128, 64), (80, 64), (16, 96), (48, 32), (112, 160)])
def test_int4_packing_is_torchs_layout(n, k):
    """Our tensor-op packing (fast) equals torch's converter (the layout its kernel reads) on full and partial
    row blocks, or msrnn falls back to torch's converter on this CPU."""
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(n * k))
    assert torch.equal(quant.pack_int4(codes), torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))


@pytest.mark.parametrize("n,k", [(64, 32), (128, 64), (80, 64), (16, 96), (48, 32), (112, 160)])
def test_int4_unpacking_inverts_the_packing(n, k):
    """unpack_int4 gives back the codes from either CPU layout (64- and 32-row blocks, full and partial)."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n + k))
    for block in (64, 32):
        assert torch.equal(quant.unpack_int4(quant._pack_int4(codes, block), block), codes)


# 5 rows: the int kernels (matrix-vector); GEMM_ROWS rows: the unpacked bf16 matrix in one product (a prefill chunk)
ROWS = [5, quant.GEMM_ROWS]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n", [48, 40])  # 40 rows: padded to 48 for the kernel, the extra outputs dropped
def test_int4_linear_multiplies_by_its_quantized_matrix(n, rows):
    w, x = torch.randn(n, 96), torch.randn(rows, 96)
    layer = quant.Int4Linear.quantize(w)
    deq = layer.dequantize()  # (out, in): read back through the kernel itself
    assert deq.shape == (n, 96)
    step = (w.view(n, 3, 32).amax(-1) - w.view(n, 3, 32).amin(-1)) / 15  # (out, groups) the code's step
    err = (w - deq).view(n, 3, 32).abs().amax(-1)
    assert (err <= step / 2 * (1 + 4 * BF16) + 2 * BF16 * w.abs().amax()).all()  # half a step (+ bf16 scales)
    if quant._int4_block() is not None:  # the bf16 matrix a chunk multiplies by is the kernel's, exactly
        assert torch.equal(layer.unpacked().float(), deq)
    y, ref = layer(x), x.bfloat16().float() @ deq.T
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    assert torch.allclose(y, ref, rtol=2 * BF16, atol=2 * BF16 * ref.abs().max())  # bf16 output rounding only


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n", [48, 40])  # 40 rows: padded to 48 for the kernel, the extra outputs dropped
def test_int8_linear_multiplies_by_its_quantized_matrix(n, rows):
    """int8 is two int4 halves over the same codes: the layer holds s * q exactly (q + 128 = 16 h + l), within
    half a code step of each group's float weights, and multiplies by it up to the halves' bf16 outputs."""
    w, x, b = torch.randn(n, 96), torch.randn(2, rows, 96), torch.randn(n)
    w[0, :32] = 0  # a group of zeros: scale clamped, codes 0
    layer = quant.Int8Linear.quantize(w, b)
    deq = layer.dequantize()
    absmax = w.view(n, 3, 32).abs().amax(-1, keepdim=True)  # (out, groups, 1)
    assert ((w - deq).view(n, 3, 32).abs() <= absmax / 127 / 2 * (1 + 4 * BF16)).all()
    codes = torch.randint(-128, 128, (n, 96), generator=torch.Generator().manual_seed(n))
    scale = torch.rand(n, 3) + 0.5  # one per group of 32
    exact = quant.Int8Linear.from_codes(codes, scale).dequantize()  # the extreme codes -128 and 127 included
    want = codes.float().view(n, 3, 32) * scale.bfloat16().float()[..., None]
    assert torch.equal(exact, want.view(n, 96))
    ref = x.bfloat16().float() @ deq.T + b.bfloat16().float()
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (2, rows, n)
    assert torch.allclose(y, ref, rtol=4 * BF16, atol=4 * BF16 * ref.abs().max())


def test_int8_codes_read_back_through_the_kernel_on_any_cpu(monkeypatch):
    """Where msrnn does not know the CPU's int4 layout, the codes are read back through the kernel itself."""
    layer = quant.Int8Linear.quantize(torch.randn(40, 64))
    want = layer.dequantize()
    monkeypatch.setattr(quant, "_int4_block", lambda: None)
    assert torch.equal(layer.dequantize(), want)


def test_gguf_blocks_are_read_as_the_files_codes(tmp_path):
    """Q4_0, Q4_1 and Q8_0 blocks read as codes (no float matrix) dequantize to exactly what the gguf package
    gives, in HF row order (Q/K un-permuted); auto puts the 4-bit ones into the int4 kernel unchanged but for its
    bf16 scales."""
    kinds = {"blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q4_1, "blk.0.attn_v.weight": Q.Q4_1,
             "blk.0.ffn_gate.weight": Q.Q4_1, "blk.0.ffn_up.weight": Q.Q4_1, "blk.0.ffn_down.weight": Q.Q8_0,
             "blk.0.attn_output.weight": Q.Q4_0, "token_embd.weight": Q.Q8_0, "output.weight": Q.Q4_1}
    path = write_gguf(tmp_path / "q.gguf", quant=kinds)
    _, floats = read_gguf(path)
    _, coded = read_gguf(path, codes=True)
    for name, w in coded.items():
        if isinstance(w, quant.Codes):
            assert torch.equal(w.dequantize(), floats[name]), name
    assert {type(w).__name__ for w in coded.values()} == {"Codes", "Tensor"}
    model = msrnn.load_model(path, dtype="auto")
    assert quant.weight_format(model) == "int4+int8"
    qkv = model.layers[0].qkv
    assert isinstance(qkv, quant.Int4Linear) and isinstance(model.layers[0].down, quant.Int8Linear)
    want = torch.cat([floats[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv"])
    assert torch.allclose(qkv.dequantize(), want, rtol=0, atol=4 * BF16 * want.abs().max())
    down = floats["model.layers.0.mlp.down_proj.weight"]  # Q8_0: the file's codes, only the scale rounded to bf16
    assert torch.allclose(model.layers[0].down.dequantize(), down, rtol=BF16, atol=0)


def tiny_dir(tmp_path, **kw):
    return save(hf_model("llama", hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         **kw), tmp_path / "m")


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_every_policy_runs_at_every_dtype(tmp_path, fmt):
    """Prefill (the layer-major scan) and steps with every built-in policy and the full model, near the fp32
    model's logits: reduced weights move logits a little (int4 of random N(0, 0.15) weights most); they must not
    break anything. Once states are evicted, a tiny difference can flip which state goes, and the logits then part
    for good: so the bound is checked where the kept sets must agree (the full model everywhere, a bounded policy
    until its budget is reached), and everywhere else the logits must be finite and the state bounded."""
    path = tiny_dir(tmp_path)
    ref, model = msrnn.load_model(path), msrnn.load_model(path, dtype=fmt)
    assert quant.weight_format(model) == fmt
    tokens = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    bound = {"bf16": 0.05, "int8": 0.05, "int4": 0.35}[fmt]  # max |Δ logit| / logit range
    k = 6
    for name in [None, *POLICY_NAMES]:
        policy = None if name is None else make_policy(name, k)
        outs = []
        for m in (ref, model):
            logits, state = m.prefill(tokens[:, :16], m.init_state(2, policy), policy, all_logits=True)
            steps = [m.step(tokens[:, t], state, policy)[0] for t in range(16, 20)]
            outs.append(torch.cat([logits, torch.stack(steps, 1)], 1))
            if policy is not None:
                assert max(layer.size for layer in state.layers) <= k + 2  # k + the incoming token + a spare slot
        a, b = outs
        assert torch.isfinite(b).all(), name
        same = 20 if policy is None else k  # positions whose kept sets cannot differ (baseline restarts at k + 1)
        a, b = a[:, :same], b[:, :same]
        assert (a - b).abs().max() <= bound * (a.max() - a.min()), (name, float((a - b).abs().max()))


def test_int_weights_need_inputs_in_groups_of_32(tmp_path):
    """Both int formats run on the int4 kernel, whose smallest group is 32 inputs: anything else is refused with
    the formats that work."""
    with pytest.raises(CheckpointError, match="int8 .*divisible by 32.*bf16"):
        quant.Int8Linear.quantize(torch.randn(8, 48))
    path = save(hf_model("llama"), tmp_path / "m")  # hidden 32, intermediate 48: down_proj takes 48 inputs
    for fmt in ("int4", "int8"):
        with pytest.raises(CheckpointError, match=f"{fmt} .*divisible by 32.*bf16"):
            msrnn.load_model(path, dtype=fmt)
    assert quant.weight_format(msrnn.load_model(path, dtype="bf16")) == "bf16"


def test_bad_dtype_and_device_say_what_to_do(tmp_path):
    path = tiny_dir(tmp_path)
    with pytest.raises(CheckpointError, match="int3.*fp32.*bf16.*int8.*int4.*auto"):
        msrnn.load_model(path, dtype="int3")
    with pytest.raises(InputError, match="CPU only.*bf16"):
        quant.check_device(msrnn.load_model(path, dtype="int8"), "cuda")
    quant.check_device(msrnn.load_model(path, dtype="bf16"), "cuda")  # float weights go anywhere
    assert quant.device_dtype("auto", "cuda") == "bf16" and quant.device_dtype("auto", "cpu") == "auto"
    assert quant.device_dtype("int4", "cuda") == "int4"  # asked for explicitly: check_device says why not


def test_auto_keeps_a_safetensors_checkpoints_precision(tmp_path):
    model = hf_model("llama", hidden_size=64, intermediate_size=96)
    path = save(model.to(torch.bfloat16), tmp_path / "bf16")
    assert quant.weight_format(msrnn.load_model(path, dtype="auto")) == "bf16"
    path = save(model.float(), tmp_path / "fp32")
    assert quant.weight_format(msrnn.load_model(path, dtype="auto")) == "fp32"


def test_bundled_model_in_its_own_precision():
    """The bundled Q4_1/Q8_0 file under auto: int4 layers, an int8 head, fp32 around them; on real text the top-1
    token agrees with the fp32-dequantized model almost everywhere (measured PPL: docs/results/bench)."""
    model, tok = msrnn.load(dtype="auto")
    assert quant.weight_format(model) == "int4+int8" and model.dtype == torch.float32
    ref = msrnn.load_model(dtype="fp32")
    ids = torch.tensor([tok.encode("It is a truth universally acknowledged, that a single man in possession of a "
                                   "good fortune, must be in want of a wife. However little known the feelings")])
    a, b = ref(ids)[0], model(ids)[0]
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.85
    w = ref.layers[3].gate_up.weight
    assert torch.allclose(model.layers[3].gate_up.dequantize(), w, rtol=0, atol=4 * BF16 * w.abs().max())
