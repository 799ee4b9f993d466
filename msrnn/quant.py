"""Weight-only int8 and int4 linear layers: a decode step reads each weight once, so fewer bytes per weight is speed.

At batch 1 a token's cost is reading the model's matrices from memory: 4 bytes a weight in fp32, 1 in int8, 1/2 in
int4. PyTorch ships CPU kernels that multiply bf16 activations by weights kept in these formats, dequantizing inside
the kernel (the gpt-fast recipe): `torch._weight_int8pack_mm` (one scale per output row) and
`torch._weight_int4pack_mm_for_cpu` (a scale and a zero per group of 32 inputs). Both want bf16 activations (fp32 ones
take a slow path, 20x slower), so the layers below cast their input to bf16 and their output back; everything around
them (norms, RoPE, attention, the state) stays fp32, which on a CPU is faster than bf16 for those small operations.

    int8:  W[n, k] = s[n] * q[n, k]                        q in -128..127
    int4:  W[n, k] = (q[n, k] - 8) * s[g, n] + z[g, n]     q in 0..15, g = k // group

GGUF files store exactly these codes: Q4_1 blocks are w = d*q + m (so s = d, z = m + 8d) and Q4_0 blocks w = d*(q - 8)
(z = 0); `from_codes` packs them without ever making a float matrix. Q8_0 keeps one scale per 32 weights, finer than
the int8 kernel's one per row, so it is re-quantized per row (the error stays below int8's half step). The only other
loss is the kernels' bf16 scales.

The kernels are CPU-only in this form (`_for_cpu`); `check_device` says so instead of failing inside torch.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CheckpointError, InputError

FORMATS = ("fp32", "bf16", "int8", "int4", "auto")  # what `dtype=` accepts (torch dtypes too, for fp32/bf16)
GROUP = 32  # int4 group size along the input dimension, as in GGUF's Q4 blocks
# From this many input rows on (a prefill chunk, not a decode step), unpacking the matrix to bf16 and running one
# matrix-matrix product beats the int kernels, which are matrix-vector kernels: on a 512-row chunk the kernel reads
# each weight once per row block while the bf16 product runs at the CPU's bf16 FMA rate (docs/results, "prefill").
GEMM_ROWS = 64


@functools.lru_cache(maxsize=1)
def _gemm_pays() -> bool:
    """Measured on AVX-512 CPUs (bf16 products in hardware); elsewhere the int kernels stay (bf16 may be emulated)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


class Int8Linear(nn.Module):
    """y = x W^T + b with W = s[:, None] * q: int8 codes (out, in) and one bf16 scale per output row."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        if self.in_features % 16:  # the kernel reads 16 inputs at a time (and crashes on a ragged end)
            raise CheckpointError(f"int8 weights need an input size divisible by 16; this matrix is "
                                  f"{self.out_features} x {self.in_features}. Load the model with dtype bf16 or fp32.")
        self.register_buffer("weight", q)  # (out, in) int8
        self.register_buffer("scale", scale.to(torch.bfloat16))  # (out,)
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        """Symmetric per-row int8 of a float matrix (out, in): the scale is the row's largest |w| / 127."""
        w = w.float()
        absmax = torch.maximum(w.amax(dim=1), -w.amin(dim=1))  # (out,) largest |w| per row (faster than abs())
        scale = (absmax / 127).clamp(min=1e-12).to(torch.bfloat16)  # (out,)
        q = (w / scale.float()[:, None]).round_().clamp_(-128, 127).to(torch.int8)  # codes for the rounded scale
        return cls(q, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (rows, in)
        if x2.shape[0] >= GEMM_ROWS and _gemm_pays():  # a chunk: one bf16 matrix product over the unpacked weights
            y = F.linear(x2, self.dequantize().to(torch.bfloat16))
        else:
            y = torch._weight_int8pack_mm(x2, self.weight, self.scale)
        y = y.view(*x.shape[:-1], -1)  # (..., out) bf16
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]  # (out, in)


class Int4Linear(nn.Module):
    """y = x W^T + b with W[n, k] = (q - 8) * s[k // 32, n] + z[k // 32, n]: 4-bit codes packed by torch's CPU
    kernel layout, and bf16 (scale, zero) pairs per group of 32 inputs.

    The kernel needs the number of output rows to be a multiple of 16: the packed matrix gets zero rows at the end
    and forward drops their outputs."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None):
        """codes (out, in) integers 0..15; scale, zero (out, in // 32): W = (codes - 8) * scale + zero."""
        super().__init__()
        n, k = _check_groups(codes.shape)
        pad = -n % 16
        if pad:
            codes, scale, zero = (F.pad(t, (0, 0, 0, pad)) for t in (codes.to(torch.uint8), scale, zero))
        self.out_features, self.in_features = n, k
        self.register_buffer("packed", pack_int4(codes))
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # (in // 32, out + pad, 2)
        self.register_buffer("scale_zero", sz.to(torch.bfloat16).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> "Int4Linear":
        """Asymmetric group-wise int4 of a float matrix (out, in): each group of 32 spans its own [min, max]."""
        n, k = _check_groups(w.shape)
        g = w.float().reshape(n, k // GROUP, GROUP)  # (out, groups, 32)
        lo, hi = g.amin(-1), g.amax(-1)  # (out, groups)
        scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16).float()  # rounded as the kernel will read it
        zero = (lo + 8 * scale).to(torch.bfloat16).float()
        codes = ((g - (zero - 8 * scale)[..., None]) / scale[..., None]).round().clamp(0, 15)  # (out, groups, 32)
        return cls(codes.reshape(n, k), scale, zero, bias)

    @classmethod
    def from_codes(cls, codes, scale, offset, bias=None) -> "Int4Linear":
        """From GGUF's Q4_1 form W = scale * codes + offset (Q4_0: offset = -8 * scale), per group of 32."""
        return cls(codes, scale, offset + 8 * scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        x2 = x.reshape(-1, k).to(torch.bfloat16)  # (rows, in)
        if x2.shape[0] >= GEMM_ROWS and _gemm_pays() and _int4_block() is not None:  # a chunk: one bf16 product
            y = F.linear(x2, self.unpacked())  # (rows, out) bf16
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP, self.scale_zero)  # (rows, out + pad) bf16
        if y.shape[1] != self.out_features:  # the kernel's padding rows
            y = y[:, : self.out_features]
        y = y.view(*x.shape[:-1], self.out_features)
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    def unpacked(self) -> torch.Tensor:
        """W (out, in) in bf16, computed from the packed codes with tensor ops: (q - 8) * s + z in fp32, rounded once."""
        n, k = self.out_features, self.scale_zero.shape[0] * GROUP
        codes = unpack_int4(self.packed, _int4_block())[:n].view(n, k // GROUP, GROUP)  # (out, groups, 32) 0..15
        scale, zero = self.scale_zero[:, :n].float().permute(2, 1, 0)[..., None]  # (out, groups, 1) each
        return (codes.float().sub_(8).mul_(scale).add_(zero)).view(n, k).to(torch.bfloat16)

    def dequantize(self) -> torch.Tensor:
        """The float matrix (out, in) the kernel multiplies by (a test's reference)."""
        k = self.scale_zero.shape[0] * GROUP
        eye = torch.eye(k, dtype=torch.bfloat16)
        # W^T = I W^T: the kernel applied to the identity reads back every weight as it uses it (bf16-rounded output)
        return torch._weight_int4pack_mm_for_cpu(eye, self.packed, GROUP, self.scale_zero)[:, : self.out_features].T.float()


def _check_groups(shape) -> tuple[int, int]:
    """(out, in) of a matrix int4 can hold: its input size must split into groups of 32."""
    n, k = shape
    if k % GROUP:
        raise CheckpointError(f"int4 weights need an input size divisible by {GROUP}; this matrix is {n} x {k}. "
                              "Load the model with dtype int8 (or bf16/fp32) instead.")
    return n, k


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, K) in 0..15 -> (N, K/2) bytes in the layout of torch's CPU int4 kernel.

    `torch._convert_weight_to_int4pack_for_cpu` does this with a scalar loop (2 s for SmolLM2's 106 M weights); the
    layout is simple enough to build with a few tensor ops (0.1 s): rows go in blocks of 64 (AVX-512) or 32 (AVX2),
    and each byte holds row r of a block in its low nibble and row r + block/2 in its high one, stored input-major
    ((N/block, K, block/2) per block); a last partial block pairs adjacent rows. The layout depends on the CPU's
    kernel, so ours is checked against torch's once per process and torch's is used if they differ."""
    block = _int4_block()
    if block is None:
        return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    return _pack_int4(codes, block)


def _pack_int4(codes: torch.Tensor, block: int) -> torch.Tensor:
    N, K = codes.shape
    c = codes.to(torch.uint8)
    parts, full = [], N - N % block
    if full:
        lanes = c[:full].view(full // block, 2, block // 2, K)  # (blocks, low | high half, rows, K)
        byte = (lanes[:, 1] << 4) | lanes[:, 0]  # (blocks, block/2, K)
        parts.append(byte.transpose(1, 2).reshape(-1))  # input-major inside each block
    if N > full:
        rest = c[full:]
        parts.append(((rest[1::2] << 4) | rest[0::2]).T.reshape(-1))  # adjacent rows share a byte
    return torch.cat(parts).view(N, K // 2)


def unpack_int4(packed: torch.Tensor, block: int) -> torch.Tensor:
    """The inverse of `_pack_int4`: (N, K/2) bytes in the kernel's layout -> codes (N, K) uint8 in 0..15."""
    N, K = packed.shape[0], packed.shape[1] * 2
    flat, full = packed.reshape(-1), N - N % block
    parts = []
    if full:
        byte = flat[: full * K // 2].view(full // block, K, block // 2)  # (blocks, K, block/2) input-major
        lanes = torch.stack([byte & 15, byte >> 4], dim=1)  # (blocks, low | high half, K, block/2)
        parts.append(lanes.transpose(2, 3).reshape(full, K))
    if N > full:
        byte = flat[full * K // 2 :].view(K, (N - full) // 2).T  # (rows/2, K): adjacent rows share a byte
        parts.append(torch.stack([byte & 15, byte >> 4], dim=1).reshape(N - full, K))
    return torch.cat(parts)


@functools.lru_cache(maxsize=1)
def _int4_block() -> int | None:
    """The row block of this CPU's int4 kernel layout, if `_pack_int4` reproduces torch's packing exactly."""
    block = {"AVX512": 64, "AVX2": 32}.get(torch.backends.cpu.get_cpu_capability())
    probe = torch.randint(0, 16, (2 * 64 + 16, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    if block is None or not torch.equal(_pack_int4(probe, block), torch._convert_weight_to_int4pack_for_cpu(probe, 1)):
        return None
    return block


def linear(fmt: str, w, bias: torch.Tensor | None = None) -> nn.Module:
    """The layer for one weight in format fmt ('int8', 'int4', 'fp32', 'bf16'); w is a float matrix (out, in) or
    `Codes` straight from a GGUF file (4-bit codes go into the int4 kernel as they are)."""
    if isinstance(w, Codes):
        if fmt == "int4" and w.bits == 4:
            return Int4Linear.from_codes(w.codes, w.scale, w.offset, bias)
        w = w.dequantize()  # another format than the file's: re-quantize from the float values
    if fmt == "int8":
        return Int8Linear.quantize(w, bias)
    if fmt == "int4":
        return Int4Linear.quantize(w, bias)
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return layer


class Codes:
    """A GGUF block-quantized matrix (Q4_0, Q4_1, Q8_0) as its codes, not yet packed: codes (out, in) integers,
    scale and offset (out, in // 32) fp32, W = scale * codes + offset per group of 32. Rows can be permuted and
    stacked like a matrix's (`rows`, `cat`), which is all loading needs (llama.cpp's Q/K row order, fused q|k|v)."""

    def __init__(self, codes, scale, offset, bits: int):
        self.codes, self.scale, self.offset, self.bits = codes, scale, offset, bits

    @property
    def shape(self):
        return self.codes.shape

    def rows(self, fn) -> "Codes":
        return Codes(fn(self.codes), fn(self.scale), fn(self.offset), self.bits)

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        w = self.codes.float().view(n, k // GROUP, GROUP).mul_(self.scale[..., None])  # (out, groups, 32)
        return (w if self.bits == 8 else w.add_(self.offset[..., None])).view(n, k)  # Q8_0 has no offset


def cat(parts: list):
    """torch.cat along rows, for float matrices and `Codes` alike (codes of different kinds meet as floats)."""
    if all(isinstance(p, Codes) for p in parts) and len({p.bits for p in parts}) == 1:
        return Codes(*(torch.cat([getattr(p, a) for p in parts]) for a in ("codes", "scale", "offset")), parts[0].bits)
    return torch.cat([p.dequantize() if isinstance(p, Codes) else p for p in parts])


def native_format(w, compute: str) -> str:
    """The format a weight keeps under dtype='auto': its file's own (4-bit codes -> int4, 8-bit -> int8)."""
    return compute if not isinstance(w, Codes) else "int4" if w.bits == 4 else "int8"


INT_LAYERS = (Int8Linear, Int4Linear)  # layers whose weights are int codes (CPU kernels, bf16 activations)
LINEARS = (nn.Linear, *INT_LAYERS)  # every kind of matrix layer a model may hold


def weight_format(model: nn.Module) -> str:
    """'fp32', 'bf16', 'int8', 'int4', or a mix such as 'int4+int8' (a GGUF file's own formats)."""
    names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    kinds = {"int4" if isinstance(m, Int4Linear) else "int8" if isinstance(m, Int8Linear) else names[m.weight.dtype]
             for m in model.modules() if isinstance(m, LINEARS)}
    return "+".join(sorted(kinds, key=["int4", "int8", "bf16", "fp32"].index))


def device_dtype(dtype, device) -> str:
    """`auto` where the int kernels cannot run (a GPU) means bf16: the checkpoint's precision as near as that
    device gets. Anything else is what was asked for (and `check_device` refuses int weights off the CPU)."""
    return "bf16" if dtype == "auto" and torch.device(device).type != "cpu" else dtype


def check_device(model: nn.Module, device) -> None:
    """int weights run on CPU only (the kernels above); say so before torch fails inside one."""
    if torch.device(device).type != "cpu" and any(isinstance(m, INT_LAYERS) for m in model.modules()):
        raise InputError(f"int8/int4 weights run on the CPU only (torch's _for_cpu kernels); on {device} load the "
                         "model with --dtype bf16 (or fp32).")
