"""The training loss over the vocabulary: label-smoothed cross-entropy plus z-loss, per target token.

Shape legend (as in model.py): B rows, T target positions, N = B * T flattened positions, D d_model,
V the real vocabulary (``vocab_size``), P the padded vocabulary (rows of the unembedding matrix, P >= V).

Per target token t with logits z over the real vocabulary (the padded rows P - V never count):

    lse_t    = log sum_v exp z_v
    nll_t    = lse_t - z_{y_t}
    smooth_t = lse_t - mean_v z_v                       (cross-entropy against the uniform distribution)
    loss_t   = (1 - eps) * nll_t + eps * smooth_t + z_loss * lse_t^2

(label smoothing as in Szegedy et al. 2016 / the paper's tensor2tensor recipe; the z-loss of Chowdhery et
al. 2022, PaLM, section 5). Its gradient with respect to the logits, with p = softmax(z) and V real words:

    d loss_t / d z = p * (1 + 2 z_loss lse_t) - (1 - eps) onehot(y_t) - eps / V

:func:`token_losses` computes the per-token values from whole logits (evaluation, tests). The training step
uses :func:`linear_cross_entropy`, which never holds the logits of the whole batch: it multiplies the final
hidden states by the unembedding matrix one chunk of rows at a time (in the autocast dtype, bf16 on a GPU,
upcast to fp32 per chunk), reduces the chunk to its loss and computes the chunk's gradients at once
(hidden states and unembedding), so the peak extra memory is one chunk of logits, not N x P of them.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

CHUNK_ELEMENTS = 1 << 26      # logits per chunk (256 MiB in fp32): rows per chunk = CHUNK_ELEMENTS // P


def token_losses(logits_BTV, targets_BT, vocab_size: int, label_smoothing: float = 0.0):
    """Per-token (smoothed loss, NLL, logsumexp) in float32 over the real vocabulary (no padded rows).

    ``logits_BTV``: [..., P] (any float dtype; upcast to float32), ``targets_BT``: [...] token ids (negative
    ids are clamped to 0; mask them out yourself). Returns three float32 tensors of the targets' shape, in
    nats. No z-loss here: add ``z_loss * lse**2`` (as the training step does).
    """
    logits = logits_BTV[..., :vocab_size].float()
    lse_BT = torch.logsumexp(logits, dim=-1)
    tgt_logit_BT = logits.gather(-1, targets_BT.clamp(min=0)[..., None])[..., 0]
    nll_BT = lse_BT - tgt_logit_BT
    if label_smoothing:
        smooth_BT = lse_BT - logits.mean(-1)
        loss_BT = (1.0 - label_smoothing) * nll_BT + label_smoothing * smooth_BT
    else:
        loss_BT = nll_BT
    return loss_BT, nll_BT, lse_BT


def chunk_loss_and_grad(logits_CP, targets_C, mask_C, vocab_size: int, label_smoothing: float, z_loss: float,
                        need_grad: bool):
    """One chunk: (summed loss, summed NLL: float32; d summed loss / d logits or None).

    ``logits_CP``: [C, P] logits over the padded vocabulary in the unembedding product's dtype (bf16 on a
    GPU); only the first ``vocab_size`` columns count, upcast to float32 here (in float32 they are
    overwritten when ``need_grad``). ``targets_C``: [C] ids; ``mask_C``: [C] bool, True for tokens that
    count. The gradient is [C, P] in ``logits_CP``'s dtype, zero in the padding columns (a row stride of P,
    a multiple of 128, keeps the two gradient products on cuBLAS's aligned tensor-core kernels: a stride of
    V = 33,708 made them fall back to 2-byte-aligned kernels 3x slower on an H200). Masked tokens contribute
    exactly 0 to the sums and to the gradient (even if their logits are not finite). A pure tensor function,
    so that ``torch.compile`` fuses the upcast, the reductions and the gradient into a few kernels (see
    ``TrainStep``).
    """
    p = logits_CP.shape[-1]
    logits_CV = logits_CP[:, :vocab_size].float()
    lse_C = torch.logsumexp(logits_CV, dim=-1)
    idx_C1 = targets_C.clamp(min=0)[:, None]
    nll_C = lse_C - logits_CV.gather(-1, idx_C1)[:, 0]
    if label_smoothing:
        loss_C = (1.0 - label_smoothing) * nll_C + label_smoothing * (lse_C - logits_CV.mean(-1))
    else:
        loss_C = nll_C
    if z_loss:
        loss_C = loss_C + z_loss * lse_C.square()
    zero = torch.zeros((), dtype=loss_C.dtype, device=loss_C.device)
    loss_sum = torch.where(mask_C, loss_C, zero).sum()
    nll_sum = torch.where(mask_C, nll_C, zero).sum()
    if not need_grad:
        return loss_sum, nll_sum, None
    v = vocab_size
    coef_C = 1.0 + 2.0 * z_loss * lse_C if z_loss else torch.ones_like(lse_C)
    coef_C = torch.where(mask_C, coef_C, zero)
    grad_CV = logits_CV.sub_(lse_C[:, None]).exp_().mul_(coef_C[:, None])          # p * coef, in place
    m_C = mask_C.to(grad_CV.dtype)
    grad_CV.scatter_add_(-1, idx_C1, (-(1.0 - label_smoothing) * m_C)[:, None])
    if label_smoothing:
        grad_CV.sub_((label_smoothing / v) * m_C[:, None])
    return loss_sum, nll_sum, torch.nn.functional.pad(grad_CV.to(logits_CP.dtype), (0, p - v))


def chunk_rows_for(padded_vocab: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that one chunk of logits holds about ``chunk_elements`` values (a multiple of 8)."""
    rows = max(8, chunk_elements // max(1, padded_vocab))
    return rows - rows % 8


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_t mask_t * loss_t over logits h @ W^T computed chunk by chunk; gradients made in the forward."""

    @staticmethod
    def forward(ctx, h_ND, w_PD, targets_N, mask_N, vocab_size, label_smoothing, z_loss, chunk_rows,
                compute_dtype, chunk_fn):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_grad = need_h or need_w
        n = h_ND.shape[0]
        hc = h_ND.to(compute_dtype)
        wc = w_PD.to(compute_dtype)
        loss_sum = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        nll_sum = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        grad_h = torch.empty_like(h_ND) if need_h else None
        grad_w = torch.zeros(w_PD.shape, dtype=torch.float32, device=w_PD.device) if need_w else None
        for r0 in range(0, n, chunk_rows):
            r1 = min(n, r0 + chunk_rows)
            logits_CP = hc[r0:r1] @ wc.t()                                   # [C, P] compute dtype
            ls, ns, g_CP = chunk_fn(logits_CP, targets_N[r0:r1], mask_N[r0:r1], vocab_size, label_smoothing,
                                    z_loss, need_grad)
            del logits_CP
            loss_sum += ls
            nll_sum += ns
            if need_grad:
                if need_h:
                    grad_h[r0:r1] = g_CP @ wc
                if need_w:
                    grad_w += g_CP.t() @ hc[r0:r1]
            del g_CP
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.has = (need_h, need_w)
        ctx.w_dtype = w_PD.dtype
        ctx.mark_non_differentiable(nll_sum)
        return loss_sum, nll_sum

    @staticmethod
    def backward(ctx, grad_loss, grad_nll):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.has
        gh = saved.pop(0) * grad_loss if need_h else None
        gw = (saved.pop(0) * grad_loss).to(ctx.w_dtype) if need_w else None
        return gh, gw, None, None, None, None, None, None, None, None


def linear_cross_entropy(h_ND, weight_PD, targets_N, mask_N, vocab_size: int, label_smoothing: float = 0.0,
                         z_loss: float = 0.0, chunk_rows: Optional[int] = None, compute_dtype=None,
                         chunk_fn: Optional[Callable] = None):
    """(sum of loss_t over the masked tokens, sum of nll_t over them): float32 scalars, nats.

    ``h_ND``: [N, D] final hidden states; ``weight_PD``: [P, D] the unembedding matrix (the tied embedding);
    ``targets_N``: [N] ids; ``mask_N``: [N] bool (True: the token counts). Equals
    ``token_losses(h @ W.T, ...)`` + ``z_loss * lse**2``, masked and summed (tests/test_loss.py), with
    gradients for ``h_ND`` and ``weight_PD`` through the first output only (the NLL sum is for logging).

    ``compute_dtype``: the dtype of the logits matmul (default: the autocast dtype when autocast is on for
    ``h_ND``'s device, else ``h_ND``'s dtype); each chunk of logits is upcast to float32 before the
    softmax. ``chunk_rows``: rows per chunk (default :func:`chunk_rows_for` the padded vocabulary).
    ``chunk_fn``: a (possibly compiled) replacement for :func:`chunk_loss_and_grad`.
    """
    dev = h_ND.device.type
    if compute_dtype is None:
        compute_dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h_ND.dtype)
    chunk_rows = chunk_rows or chunk_rows_for(weight_PD.shape[0])
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(h_ND, weight_PD, targets_N, mask_N, vocab_size, float(label_smoothing),
                                         float(z_loss), int(chunk_rows), compute_dtype,
                                         chunk_fn or chunk_loss_and_grad)
