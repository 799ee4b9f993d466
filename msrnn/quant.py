"""Weight-only int8 and int4 linear layers: a decode step reads each weight once, so fewer bytes per weight is speed.

At batch 1 a token's cost is reading the model's matrices from memory: 4 bytes a weight in fp32, 1 in int8, 1/2 in
int4. PyTorch ships a CPU kernel that multiplies bf16 activations by 4-bit codes, dequantizing inside the kernel (the
gpt-fast recipe): `torch._weight_int4pack_mm_for_cpu`, a scale and a zero per group of 32 inputs. It wants bf16
activations (fp32 ones take a slow path, 20x slower), so the layers below cast their input to bf16 and their output
back; everything around them (norms, RoPE, attention, the state) stays fp32, which on a CPU is faster than bf16 for
those small operations.

    int4:  W[n, k] = (q[n, k] - 8) * s[g, n] + z[g, n]     q in 0..15, g = k // 32
    int8:  W[n, k] = s[g, n] * q[n, k]                      q in -128..127, as two int4 halves (Int8Linear)

GGUF files store exactly these codes: Q4_1 blocks are w = d*q + m (so s = d, z = m + 8d), Q4_0 blocks w = d*(q - 8)
(z = 0) and Q8_0 blocks w = d*q; `from_codes` packs them without ever making a float matrix. The only loss is the
kernel's bf16 scales (and bf16 activations).

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


class Int4Linear(nn.Module):
    """y = x W^T + b with W[n, k] = (q - 8) * s[k // 32, n] + z[k // 32, n]: 4-bit codes packed by torch's CPU
    kernel layout, and bf16 (scale, zero) pairs per group of 32 inputs.

    The kernel needs the number of output rows to be a multiple of 16: the packed matrix gets zero rows at the end
    and forward drops their outputs."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None):
        """codes (out, in) integers 0..15; scale, zero (out, in // 32): W = (codes - 8) * scale + zero."""
        super().__init__()
        self.out_features, self.in_features = _check_groups(codes.shape, "int4")
        packed, scale_zero = int4_operands(codes, scale, zero)
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zero", scale_zero)
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> "Int4Linear":
        """Asymmetric group-wise int4 of a float matrix (out, in): each group of 32 spans its own [min, max]."""
        n, k = _check_groups(w.shape, "int4")
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
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (rows, in)
        if x2.shape[0] >= GEMM_ROWS and _gemm_pays() and _int4_block() is not None:  # a chunk: one bf16 product
            y = F.linear(x2, self.unpacked())  # (rows, out) bf16
        else:
            y = int4_mm(x2, self.packed, self.scale_zero, self.out_features)  # (rows, out) bf16
        y = y.view(*x.shape[:-1], self.out_features)
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    def unpacked(self) -> torch.Tensor:
        """W (out, in) in bf16, computed from the packed codes with tensor ops: (q - 8) * s + z in fp32, rounded once."""
        n, k = self.out_features, self.in_features
        codes = int4_codes(self.packed, n).view(n, k // GROUP, GROUP)  # (out, groups, 32) 0..15
        scale, zero = self.scale_zero[:, :n].float().permute(2, 1, 0)[..., None]  # (out, groups, 1) each
        return (codes.float().sub_(8).mul_(scale).add_(zero)).view(n, k).to(torch.bfloat16)

    def dequantize(self) -> torch.Tensor:
        """The float matrix (out, in) the kernel multiplies by (a test's reference)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        # W^T = I W^T: the kernel applied to the identity reads back every weight as it uses it (bf16-rounded output)
        return int4_mm(eye, self.packed, self.scale_zero, self.out_features).T.float()


class Int8Linear(nn.Module):
    """y = x W^T + b with W[n, k] = s[k // 32, n] * q[n, k]: 8-bit codes q in -128..127 and a bf16 scale per group of
    32 inputs (GGUF's Q8_0 blocks, kept as they are but for the bf16 scale).

    There is no CPU kernel for group-scaled 8-bit codes, and torch's per-row one (`_weight_int8pack_mm`) takes 3x the
    int4 kernel's time over the same matrix at batch 1 (5.7 vs 2.1 ms for the bundled model's 49,152 x 576 output
    layer, one thread). So each code is split into two 4-bit halves, q + 128 = 16 h + l, and the layer is the sum of
    two int4 layers over the same bytes, with bf16 scales that are exact (powers of two times s):

        W = s (16 h + l - 128) = [(h - 8) 16 s + 8 s]  +  [(l - 8) s + 0]
            (the int4 form (q - 8) * scale + zero:   high: scale 16 s, zero 8 s;   low: scale s, zero 0)

    Each half's product is rounded to bf16 once and the two are added in fp32."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        """codes (out, in) integers -128..127; scale (out, in // 32): W = scale * codes per group of 32."""
        super().__init__()
        self.out_features, self.in_features = _check_groups(codes.shape, "int8")
        u = codes.to(torch.int16) + 128  # (out, in) 0..255 = 16 h + l
        scale = scale.to(torch.bfloat16).float()  # as the kernel reads it: 16 s and 8 s are then exact too
        high, high_sz = int4_operands(u >> 4, 16 * scale, 8 * scale)
        low, low_sz = int4_operands(u & 15, scale, torch.zeros_like(scale))
        for name, t in (("high", high), ("high_scale_zero", high_sz), ("low", low), ("low_scale_zero", low_sz)):
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        """Symmetric group-wise int8 of a float matrix (out, in): each group of 32 scaled by its largest |w| / 127."""
        n, k = _check_groups(w.shape, "int8")
        g = w.float().reshape(n, k // GROUP, GROUP)  # (out, groups, 32)
        absmax = torch.maximum(g.amax(-1), -g.amin(-1))  # (out, groups) largest |w| (faster than abs())
        scale = (absmax / 127).clamp(min=1e-12).to(torch.bfloat16).float()  # rounded as the kernel will read it
        codes = (g / scale[..., None]).round_().clamp_(-128, 127)  # codes for the rounded scale
        return cls(codes.reshape(n, k), scale, bias)

    @classmethod
    def from_codes(cls, codes, scale, bias=None) -> "Int8Linear":
        """From GGUF's Q8_0 form W = scale * codes, per group of 32."""
        return cls(codes, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (rows, in)
        n = self.out_features
        if x2.shape[0] >= GEMM_ROWS and _gemm_pays() and _int4_block() is not None:  # a chunk: one bf16 product
            y = F.linear(x2, self.dequantize().to(torch.bfloat16)).float()  # (rows, out)
        else:  # the two halves' products (rows, out) bf16, added in fp32
            y = int4_mm(x2, self.high, self.high_scale_zero, n).float().add_(int4_mm(x2, self.low, self.low_scale_zero, n))
        y = y.view(*x.shape[:-1], n)
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """W (out, in) fp32, exactly s * q as the two halves hold it."""
        n, k = self.out_features, self.in_features
        q = int4_codes(self.high, n).float() * 16 + int4_codes(self.low, n).float() - 128  # (out, in)
        scale = self.low_scale_zero[:, :n, 0].T.float()  # (out, groups)
        return (q.view(n, k // GROUP, GROUP) * scale[..., None]).view(n, k)


def int4_operands(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """codes (out, in) 0..15 and scale, zero (out, in // 32) -> the int4 kernel's operands: the packed codes
    (out + pad, in / 2) uint8 and the (scale, zero) pairs (in // 32, out + pad, 2) bf16; the kernel wants a multiple
    of 16 output rows, so `pad` zero rows are added (int4_mm drops their outputs)."""
    pad = -codes.shape[0] % 16
    codes = codes.to(torch.uint8)
    if pad:
        codes, scale, zero = (F.pad(t, (0, 0, 0, pad)) for t in (codes, scale, zero))
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # (in // 32, out + pad, 2)
    return pack_int4(codes), sz.to(torch.bfloat16).contiguous()


def int4_mm(x2: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, out: int) -> torch.Tensor:
    """x2 (rows, in) bf16 times the int4 matrix's transpose -> (rows, out) bf16, without the padding rows."""
    y = torch._weight_int4pack_mm_for_cpu(x2, packed, GROUP, scale_zero)  # (rows, out + pad)
    return y if y.shape[1] == out else y[:, :out]


def int4_codes(packed: torch.Tensor, out: int) -> torch.Tensor:
    """The codes (out, in) 0..15 of a packed matrix: unpacked with tensor ops where msrnn knows this CPU's layout,
    else read back through the kernel itself (scale 1 and zero 8 make each weight its code, exact in bf16)."""
    block = _int4_block()
    if block is not None:
        return unpack_int4(packed, block)[:out]
    k = packed.shape[1] * 2
    unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).expand(k // GROUP, packed.shape[0], 2).contiguous()
    return int4_mm(torch.eye(k, dtype=torch.bfloat16), packed, unit, out).T.to(torch.uint8)


def _check_groups(shape, fmt: str) -> tuple[int, int]:
    """(out, in) of a matrix the int4 kernel can hold (int8 too: two int4 halves): its inputs must split into groups
    of 32 (the kernel's smallest)."""
    n, k = shape
    if k % GROUP:
        raise CheckpointError(f"{fmt} weights need an input size divisible by {GROUP}; this matrix is {n} x {k}. "
                              "Load the model with dtype bf16 or fp32 instead.")
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
        if fmt == "int8" and w.bits == 8:  # Q8_0: no offset
            return Int8Linear.from_codes(w.codes, w.scale, bias)
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
