"""The training step's speed switches change speed, not results: torch.compile with the shape policy
(traced on the CPU through a counting backend), length padding, fused / foreach optimizers; and the
numbers are read one step late without changing them."""
import pytest
import torch

from mqa_repro.model import BOS, PAD, Transformer
from mqa_repro.optim import Adafactor, build_optimizer, lr_at, set_implementation
from mqa_repro.specfile import apply_overrides, load_spec
from mqa_repro.step import Batch, StepOptions, TrainStep, pad_lengths

from .conftest import TINY


def tiny(*overrides, variant="multi_head"):
    return apply_overrides(load_spec(TINY).variants[variant],
                           ["model.dropout.residual=0", "training.z_loss=0.0001", *overrides])


def batches(shapes, vocab, seed=0):
    """Host batches of the given (rows, target width, source width), with ragged PAD tails."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, tw, sw in shapes:
        tgt = torch.randint(4, vocab, (rows, tw + 1), generator=g)
        tgt[:, 0] = BOS
        src = torch.randint(4, vocab, (rows, sw), generator=g)
        tlen = torch.randint(1, tw + 1, (rows,), generator=g)
        slen = torch.randint(1, sw + 1, (rows,), generator=g)
        tlen[0], slen[0] = tw, sw                                   # the widest row sets the width
        tseg = (torch.arange(tw)[None] < tlen[:, None]).long()
        sseg = (torch.arange(sw)[None] < slen[:, None]).long()
        tin, tout = tgt[:, :-1].masked_fill(tseg == 0, PAD), tgt[:, 1:].masked_fill(tseg == 0, PAD)
        out.append(Batch(tin, tout, tseg, src.masked_fill(sseg == 0, PAD), sseg))
    return out


def run_steps(v, host, options, steps=None):
    torch.manual_seed(0)
    model = Transformer(v.model)
    opt = build_optimizer(model, v.training)
    step = TrainStep(model, opt, v.training, torch.device("cpu"), options=options)
    losses = []
    for k, b in enumerate(host[:steps] if steps else host):
        n = int((b.tgt_out_BT != PAD).sum())
        losses.append(step([step.prepare(b)], n, lr_at(k + 1, v.training)).read()["loss"])
    return losses, model, step


SHAPES = [(5, 13, 11), (7, 9, 17), (3, 21, 6), (6, 13, 11), (4, 30, 25), (8, 7, 9)]


def test_padding_lengths_changes_nothing():
    v = tiny()
    host = batches(SHAPES, v.model.vocab_size)
    plain, m1, _ = run_steps(v, host, StepOptions(pad_multiple=1))
    padded, m2, _ = run_steps(v, host, StepOptions(pad_multiple=16))
    assert pad_lengths(host[0], 16).tgt_in_BT.shape == (5, 16) and pad_lengths(host[0], 16).src_BS.shape == (5, 16)
    torch.testing.assert_close(torch.tensor(padded), torch.tensor(plain), rtol=1e-5, atol=0)
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=n)


def test_compiled_step_equals_eager_and_does_not_recompile_per_batch(variant="multi_query_local"):
    """torch.compile traced through dynamo and AOT autograd (a counting backend that runs the traced
    graphs, so no C++ toolchain is needed): the same losses, and a handful of graphs for six shapes."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=count, bw_compiler=lambda gm, ex: make_boxed_func(gm.forward))
    v = tiny(variant=variant)
    host = batches(SHAPES, v.model.vocab_size)
    eager, _, _ = run_steps(v, host, StepOptions(compile=False, pad_multiple=8))
    torch._dynamo.reset()
    compiled, _, step = run_steps(v, host, StepOptions(compile=True, compile_backend=backend, pad_multiple=8))
    assert step.opts.compile
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=0)
    # The forward and the loss chunk: first a static graph each, then one with dynamic sizes; never one per batch.
    assert 0 < len(graphs) <= 6, len(graphs)
    torch._dynamo.reset()


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_fused_and_foreach_optimizers_compute_the_plain_update(optimizer):
    v = tiny(f"training.optimizer={optimizer}", "training.weight_decay=0.01")
    host = batches(SHAPES[:4], v.model.vocab_size)
    plain, m1, s1 = run_steps(v, host, StepOptions(fused_optimizer=False))
    fast, m2, s2 = run_steps(v, host, StepOptions(fused_optimizer=True))
    g1, g2 = s1.optimizer.param_groups[0], s2.optimizer.param_groups[0]
    if optimizer == "adamw":
        assert g2["fused"] and not g1["fused"]
    else:
        assert g2["foreach"] and not g1["foreach"]
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=1e-5, atol=0)
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=n)


def test_foreach_adafactor_is_torchs_update_without_reading_the_device(monkeypatch):
    """mqa_repro.optim.Adafactor(foreach=True) == torch.optim.Adafactor's per-parameter loop (matrices, a 3-D
    tensor, vectors; weight decay; maximize), state included, and its step never calls Tensor.item (torch's
    multi-tensor step reads two norms per parameter to the host)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 48), (33, 17), (5, 6, 7), (48,), (3,)]
    start = [torch.randn(s, generator=g) * (0.01 if i == 1 else 1) for i, s in enumerate(shapes)]
    for maximize in (False, True):
        a = [p.clone().requires_grad_() for p in start]
        b = [p.clone().requires_grad_() for p in start]
        ref = torch.optim.Adafactor([{"params": a[:3], "weight_decay": 0.1}, {"params": a[3:]}], lr=0.05,
                                    foreach=False, maximize=maximize)
        ours = Adafactor([{"params": b[:3], "weight_decay": 0.1}, {"params": b[3:]}], lr=0.05, foreach=True,
                         maximize=maximize)
        for k in range(12):
            for x, y in zip(a, b):
                x.grad = torch.randn(x.shape, generator=g) * (1 + k)
                y.grad = x.grad.clone()
            for o in (ref, ours):
                for group in o.param_groups:
                    group["lr"] = 0.05 / (1 + k)
            ref.step()
            with monkeypatch.context() as m:
                m.setattr(torch.Tensor, "item", lambda self: pytest.fail("Adafactor.step read a tensor"))
                ours.step()
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)
        sa, sb = ref.state_dict()["state"], ours.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            assert sa[i].keys() == sb[i].keys()
            for key in sa[i]:
                torch.testing.assert_close(sb[i][key], sa[i][key], rtol=1e-6, atol=1e-9)


def test_implementation_survives_load_state_dict():
    v = tiny()
    model = Transformer(v.model)
    plain = build_optimizer(model, v.training, fast=False)
    fast = build_optimizer(model, v.training, fast=True)
    fast.load_state_dict(plain.state_dict())            # a CPU checkpoint's flags come back with the state
    assert not fast.param_groups[0]["fused"]
    set_implementation(fast, True)
    assert fast.param_groups[0]["fused"]


def test_options_resolve_per_device():
    cpu = StepOptions().resolved(torch.device("cpu"))
    assert (cpu.compile, cpu.fused_optimizer, cpu.pad_multiple, cpu.pin_memory) == (False, False, 1, False)
    on = StepOptions(compile=True).resolved(torch.device("cpu"))
    assert on.pad_multiple == 64 and not on.pin_memory


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_compiled_loss_chunk_and_adafactor_update_equal_eager_on_cuda():
    """What the training step compiles on CUDA (the loss chunk in bf16, Adafactor's per-matrix update)
    computes what the eager functions compute."""
    from mqa_repro.loss import chunk_loss_and_grad
    from mqa_repro.optim import factored_updates

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(96, 256, generator=g, device="cuda") * 3).bfloat16()
    targets = torch.randint(4, 200, (96,), generator=g, device="cuda")
    targets[-9:] = 0
    fn = torch.compile(chunk_loss_and_grad)
    want = chunk_loss_and_grad(logits.clone(), targets, targets != 0, 200, 0.1, 1e-4, True)
    got = fn(logits.clone(), targets, targets != 0, 200, 0.1, 1e-4, True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert got[2].dtype == torch.bfloat16 and got[2].shape == (96, 256) and bool((got[2][:, 200:] == 0).all())
    torch.testing.assert_close(got[2].float(), want[2].float(), rtol=1e-2, atol=1e-4)
    grads = [torch.randn(shape, generator=g, device="cuda") for shape in [(256, 64), (64, 256), (3, 32, 16)]]
    rows = [x.square().mean(-1, keepdim=True) for x in grads]
    cols = [x.square().mean(-2, keepdim=True) for x in grads]
    got, want = torch.compile(factored_updates)(grads, rows, cols, 1e-30), factored_updates(grads, rows, cols, 1e-30)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
