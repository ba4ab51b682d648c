"""The FFN's fused ReLU + dropout (mqa_repro.relu_dropout): dropout's distribution and scaling, the
gradient from the output alone, fresh draws at every call (also compiled), and the CPU path unchanged.
The kernel runs on a GPU, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``)."""
import os

import pytest
import torch
import torch.nn.functional as F

from mqa_repro import relu_dropout as rd
from mqa_repro.model import FeedForward

if torch.cuda.is_available() and rd.triton is not None:
    DEV = torch.device("cuda")
elif rd.triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
    DEV = torch.device("cpu")
else:
    DEV = None
needs_triton = pytest.mark.skipif(DEV is None, reason="needs a GPU with Triton, or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keeps_each_element_with_probability_one_minus_p_and_scales_it(dtype):
    if DEV.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter runs float32 only")
    p = 0.1
    h = torch.randn(37, 2011, device=DEV, generator=torch.Generator(DEV).manual_seed(0)).to(dtype)  # odd size
    torch.manual_seed(1)
    y = rd.relu_dropout(h, p)
    assert y.shape == h.shape and y.dtype == dtype
    kept = y != 0
    assert not bool((kept & (h <= 0)).any())                          # ReLU: nothing negative survives
    want = (F.relu(h.float()) * (1 / (1 - p))).to(dtype)
    torch.testing.assert_close(y[kept], want[kept], rtol=0, atol=0)   # kept elements scaled by 1 / (1 - p)
    frac = kept.sum().item() / (h > 0).sum().item()
    assert abs(frac - (1 - p)) < 0.01, frac                            # about 37,000 positives: 5 sigma
    torch.manual_seed(1)
    assert torch.equal(rd.relu_dropout(h, p), y)                      # the CPU generator's seed repeats it
    assert not torch.equal(rd.relu_dropout(h, p), y)                  # and the next call draws afresh
    torch.testing.assert_close(rd.relu_dropout(h, 0.0), F.relu(h), rtol=0, atol=0)


@needs_triton
def test_gradient_is_taken_from_the_output():
    h = torch.randn(64, 300, device=DEV, requires_grad=True)
    y = rd.relu_dropout(h, 0.25)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(h.grad, dy * (y.detach() > 0) * (1 / 0.75), rtol=0, atol=0)


@needs_triton
def test_compiled_graph_draws_afresh_every_call_without_a_graph_break():
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(h):
        return rd.relu_dropout(h * 2.0, 0.5) + 1.0

    torch._dynamo.reset()
    fc = torch.compile(f, backend=count, fullgraph=True)
    h = torch.rand(8, 512, device=DEV) + 0.1                          # all positive
    a, b = fc(h), fc(h)
    assert len(graphs) == 1
    assert not torch.equal(a, b)
    for y in (a, b):
        kept = y != 1.0
        torch.testing.assert_close(y[kept], h[kept] * 4.0 + 1.0)
    torch._dynamo.reset()


def test_bad_probability_and_the_cpu_path():
    with pytest.raises(ValueError, match="dropout probability"):
        rd.relu_dropout(torch.ones(4), 1.0)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="CUDA"):
            rd.relu_dropout(torch.ones(4), 0.1)
    # On the CPU the feed-forward layer keeps torch's dropout: the same draws as before the fused kernel.
    ffn = FeedForward(8, 32, relu_dropout=0.3).train()
    x = torch.randn(5, 8)
    torch.manual_seed(3)
    got = ffn(x)
    torch.manual_seed(3)
    want = ffn.wo(F.dropout(F.relu(ffn.wi(x)), 0.3, training=True))
    assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available() or rd.triton is None, reason="needs a GPU with Triton")
def test_feed_forward_on_cuda_takes_the_fused_kernel_compiled_as_eager():
    """In training on CUDA the layer runs the fused kernel (fresh draws per call); compiled by inductor it
    computes what eager computes from the same CPU seed, gradients included."""
    ffn = FeedForward(64, 256, relu_dropout=0.1).cuda().train()
    x = torch.randn(48, 64, device="cuda")
    outs = []
    for fn in (ffn, torch.compile(ffn)):
        ffn.zero_grad()
        torch.manual_seed(5)
        y = fn(x)
        y.square().sum().backward()
        outs.append((y.detach(), ffn.wi.weight.grad.clone(), ffn.wo.weight.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.manual_seed(5)
    hidden = F.relu(ffn.wi(x))
    torch.manual_seed(5)
    assert not torch.equal(ffn(x), ffn.wo(F.dropout(hidden, 0.1)))   # not torch's dropout draws: the kernel's
