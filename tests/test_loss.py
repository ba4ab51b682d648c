"""The chunked linear cross-entropy equals today's token_losses (+ z-loss) in value and gradient."""
import pytest
import torch

from mqa_repro.loss import chunk_rows_for, linear_cross_entropy, token_losses
from mqa_repro.model import PAD


def reference(h_ND, w_PD, targets_N, vocab, eps, z):
    """What train.py computed before the chunked loss: whole fp32 logits, token_losses, z-loss, masked sums."""
    logits = h_ND @ w_PD.t()
    loss, nll, lse = token_losses(logits, targets_N, vocab, eps)
    if z:
        loss = loss + z * lse.square()
    mask = targets_N != PAD
    return loss.masked_fill(~mask, 0.0).sum(), nll.masked_fill(~mask, 0.0).sum()


@pytest.mark.parametrize("eps, z, chunk", [(0.1, 1e-4, 7), (0.0, 0.0, 16), (0.1, 0.0, None), (0.2, 1e-3, 64)])
def test_linear_cross_entropy_equals_token_losses(eps, z, chunk):
    g = torch.Generator().manual_seed(0)
    n, d, vocab, padded = 61, 24, 50, 56                     # padded vocabulary rows never count
    h = (torch.randn(n, d, generator=g, dtype=torch.float64) * 2).float().requires_grad_()
    w = torch.randn(padded, d, generator=g).requires_grad_()
    targets = torch.randint(4, vocab, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[:15]] = PAD       # padding anywhere, as in unpacked batches
    targets[-5:] = PAD
    ref_loss, ref_nll = reference(h, w, targets, vocab, eps, z)
    (ref_loss * 0.37).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss, nll = linear_cross_entropy(h, w, targets, targets != PAD, vocab, eps, z, chunk_rows=chunk)
    (loss * 0.37).backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, gw, rtol=1e-5, atol=1e-6)
    assert torch.all(w.grad[vocab:] == 0)
    assert not nll.requires_grad


def test_masked_tokens_do_not_reach_the_sums_even_when_not_finite():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(10, 8, generator=g)
    h[3] = float("inf")                                      # a padded position's hidden state blew up
    h.requires_grad_()
    w = torch.randn(16, 8, generator=g, requires_grad=True)
    targets = torch.randint(4, 16, (10,), generator=g)
    targets[3] = PAD
    loss, nll = linear_cross_entropy(h, w, targets, targets != PAD, 16, 0.1, 1e-4, chunk_rows=4)
    assert torch.isfinite(loss) and torch.isfinite(nll)       # as token_losses + masked_fill: finite sums
    keep = targets != PAD
    ref_loss, ref_nll = reference(h[keep].detach(), w.detach(), targets[keep], 16, 0.1, 1e-4)
    torch.testing.assert_close(loss, ref_loss)


def test_no_grad_and_chunk_size():
    h, w = torch.randn(9, 4), torch.randn(8, 4)
    t = torch.randint(4, 8, (9,))
    with torch.no_grad():
        loss, nll = linear_cross_entropy(h, w, t, t != PAD, 8, 0.1)
    ref_loss, ref_nll = reference(h, w, t, 8, 0.1, 0.0)
    torch.testing.assert_close(loss, ref_loss)
    assert chunk_rows_for(33792) % 8 == 0 and chunk_rows_for(33792) * 33792 <= 1 << 26
    assert chunk_rows_for(10 ** 9) == 8


def test_bf16_products_are_upcast_per_chunk_and_the_padding_gets_no_gradient():
    """As on a GPU: the unembedding products in bf16, each chunk's logits upcast to float32 for the loss."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(40, 16, generator=g).requires_grad_()
    w = torch.randn(24, 16, generator=g).requires_grad_()
    targets = torch.randint(4, 20, (40,), generator=g)
    targets[-6:] = PAD
    loss, nll = linear_cross_entropy(h, w, targets, targets != PAD, 20, 0.1, 1e-4, chunk_rows=16,
                                     compute_dtype=torch.bfloat16)
    loss.backward()
    hr, wr = h.detach().bfloat16().float().requires_grad_(), w.detach().bfloat16().float().requires_grad_()
    ref_loss, ref_nll = reference(hr, wr, targets, 20, 0.1, 1e-4)
    ref_loss.backward()
    assert loss.dtype == nll.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(h.grad, hr.grad, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(w.grad, wr.grad, rtol=5e-2, atol=5e-2)
    assert torch.all(w.grad[20:] == 0)
