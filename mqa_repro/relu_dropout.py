"""The feed-forward layer's ReLU and dropout as one Triton pass on CUDA (training only).

``dropout(relu(h))`` over the FFN's hidden states is the largest elementwise tensor of the training step
(rows x d_ff: 32,768 x 4,096 at the paper's shape). Compiled by torch.compile it is a kernel that draws one
Philox number per element (``tl.rand``: a whole Philox round for each of them), about 0.5 ms a layer on an
H200 and 5 ms of the 113 ms step (notes/training-speed.md). Here one Philox call gives the dropout draws of
four elements (``tl.rand4x``), and the backward needs no mask: where the output is positive the input was
positive and kept, so dx = dy * (y > 0) / (1 - p) from the output that the next matmul's backward keeps
anyway.

The draws come from a seed taken from torch's CPU generator at each call (``torch.manual_seed`` makes runs
repeatable; the device is not read). The distribution is dropout's: each element kept with probability
1 - p and scaled by 1 / (1 - p). The masks are not the ones ``torch.nn.functional.dropout`` would draw;
the CPU path (and every evaluation) stays ``dropout(relu(h))`` (model.FeedForward).
"""
from __future__ import annotations

import os

import torch

try:  # Triton is optional: the CPU path is torch's dropout
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - no triton on this machine
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_BLOCK = 1024   # elements per Philox lane block; a program covers 4 blocks


def available(h: torch.Tensor) -> bool:
    """Whether :func:`relu_dropout` runs for ``h`` (CUDA with Triton, or Triton's CPU interpreter)."""
    return triton is not None and (h.is_cuda or _INTERPRET)


if triton is not None:
    @triton.jit
    def _relu_dropout_kernel(x_ptr, y_ptr, n, p, scale, seed, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        r0, r1, r2, r3 = tl.rand4x(seed, (pid * BLOCK + offs).to(tl.int32))
        base = pid * 4 * BLOCK + offs
        i0, i1, i2, i3 = base, base + BLOCK, base + 2 * BLOCK, base + 3 * BLOCK
        x0 = tl.load(x_ptr + i0, mask=i0 < n, other=0.0).to(tl.float32)
        x1 = tl.load(x_ptr + i1, mask=i1 < n, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + i2, mask=i2 < n, other=0.0).to(tl.float32)
        x3 = tl.load(x_ptr + i3, mask=i3 < n, other=0.0).to(tl.float32)
        out = y_ptr.dtype.element_ty
        tl.store(y_ptr + i0, tl.where((x0 > 0) & (r0 >= p), x0 * scale, 0.0).to(out), mask=i0 < n)
        tl.store(y_ptr + i1, tl.where((x1 > 0) & (r1 >= p), x1 * scale, 0.0).to(out), mask=i1 < n)
        tl.store(y_ptr + i2, tl.where((x2 > 0) & (r2 >= p), x2 * scale, 0.0).to(out), mask=i2 < n)
        tl.store(y_ptr + i3, tl.where((x3 > 0) & (r3 >= p), x3 * scale, 0.0).to(out), mask=i3 < n)


@torch.library.custom_op("mqa_repro::relu_dropout", mutates_args=())
def relu_dropout(h: torch.Tensor, p: float) -> torch.Tensor:
    """dropout(relu(h), p) in training mode: [...] -> [...], ``h``'s shape and dtype.

    Each element is kept with probability 1 - p (0 <= p < 1) and then scaled by 1 / (1 - p). Raises
    ValueError for p outside [0, 1) or more than 2^33 elements (the Philox offsets are 32-bit, four
    elements each); RuntimeError where :func:`available` is false."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not available(h):
        raise RuntimeError("relu_dropout needs a CUDA tensor and Triton")
    x = h.contiguous()
    n = x.numel()
    if n > 4 * _BLOCK * (2 ** 31 // _BLOCK):
        raise ValueError(f"relu_dropout takes at most 2^33 elements, got {n}")
    y = torch.empty_like(x)
    if n:
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())   # the CPU generator: no device read
        grid = (triton.cdiv(n, 4 * _BLOCK),)
        _relu_dropout_kernel[grid](x, y, n, float(p), 1.0 / (1.0 - p), seed, BLOCK=_BLOCK, num_warps=4)
    return y


@relu_dropout.register_fake
def _(h, p):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.scale = 1.0 / (1.0 - inputs[1])


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return dy * (y > 0).to(dy.dtype) * ctx.scale, None


relu_dropout.register_autograd(_backward, setup_context=_setup_context)
