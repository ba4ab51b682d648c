"""The decoder's Triton kernels against torch: fused residual-add + layer norm, argmax, decode attention with
tuned launches, and the fast decoder built on them. They run on a GPU, or on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py``, fp32 only); without either they
are skipped. The split-K products are plain torch and are checked everywhere."""
import os

import pytest
import torch

from mqa_repro import fastdecode as fd

from .conftest import EXPERIMENTS

if torch.cuda.is_available() and fd.triton is not None:
    DEV, DTYPES = torch.device("cuda"), (torch.float32, torch.bfloat16)
elif fd.triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
    DEV, DTYPES = torch.device("cpu"), (torch.float32,)
else:
    DEV, DTYPES = None, ()
needs_triton = pytest.mark.skipif(DEV is None, reason="needs a GPU with Triton, or TRITON_INTERPRET=1")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("s", [1, 2, 4])
def test_split_k_parts_sum_to_the_product(s):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 32, generator=g, dtype=torch.float64)
    w = torch.randn(7, 32, generator=g, dtype=torch.float64)
    parts = fd.project_parts(a, w, s)
    assert parts.shape == (s, 5, 7)
    torch.testing.assert_close(parts.sum(0), a @ w.t())
    if s > 1:   # each part is one slice of K
        torch.testing.assert_close(parts[0], a[:, :32 // s] @ w[:, :32 // s].t())
    with pytest.raises(ValueError, match="do not split"):
        fd.project_parts(a[:, :30], w[:, :30], 4)


@needs_triton
@pytest.mark.parametrize("parts", [0, 1, 3])
def test_add_layernorm_kernel_matches_torch(parts):
    for dt in DTYPES:
        g = torch.Generator().manual_seed(parts)
        d = 96   # not a power of two: the masked lanes must not enter the mean or the variance
        x = torch.randn(6, d, generator=g).to(DEV, dt)
        p = torch.randn(parts, 6, d, generator=g).to(DEV, dt) if parts else None
        norm = torch.nn.LayerNorm(d).to(DEV, dt)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(d, generator=g) + 0.5)
            norm.bias.copy_(torch.randn(d, generator=g))
        want_x = (x.float() + (p.float().sum(0) if parts else 0)).to(dt)
        want_h = torch.nn.functional.layer_norm(want_x.float(), (d,), norm.weight.float(), norm.bias.float(),
                                                norm.eps)
        with torch.no_grad():
            h = fd.add_layernorm(x, p, norm)
        torch.testing.assert_close(x.float(), want_x.float(), atol=TOL[dt], rtol=TOL[dt])
        torch.testing.assert_close(h.float(), want_h, atol=TOL[dt] * 4, rtol=TOL[dt] * 4)


@needs_triton
def test_argmax_kernel_matches_torch_including_ties():
    for dt in DTYPES:
        g = torch.Generator().manual_seed(1)
        v = 5000   # several blocks of the kernel's loop plus a ragged tail
        x = torch.randn(7, v, generator=g).to(DEV, dt)
        x[1, 17] = x[1, 4000] = 100.0           # a tie across blocks: the first index wins
        x[2, 4999] = 50.0                       # the maximum in the ragged tail
        x[3] = float("-inf")                    # nothing finite: index 0, as torch
        x[4, 9] = x[4, 10] = 77.0               # a tie inside one block
        a, b = torch.empty(7, dtype=torch.long, device=DEV), torch.empty(7, dtype=torch.long, device=DEV)
        fd.argmax_into(x, a, b)
        assert torch.equal(a, x.argmax(-1)) and torch.equal(b, a)
        assert a[1].item() == 17 and a[2].item() == 4999 and a[4].item() == 9


@needs_triton
@pytest.mark.parametrize("share,indirect", [(1, False), (4, False), (1, True)])
def test_decode_attention_kernel_matches_torch(share, indirect):
    for dt in DTYPES:
        g = torch.Generator().manual_seed(2)
        # on a GPU enough rows that the launch is tuned (fd.TUNE_MIN_ROWS); the interpreter is slow
        m, h, kv_heads, dk, slots, live = (64 if DEV.type == "cuda" else 3), 4, 2, 16, 40, 37
        n = m * share
        q = torch.randn(n, h, dk, generator=g).to(DEV, dt)
        kv = torch.randn(slots, m if not indirect else n, kv_heads, 2 * dk, generator=g).to(DEV, dt)
        anc = torch.randint(0, n, (slots, n), generator=g, dtype=torch.int32).to(DEV) if indirect else None
        want = fd.decode_attention(q, kv, live, dk, share, dk ** -0.5, anc, True, use_triton=False)
        got = fd.decode_attention(q, kv, live, dk, share, dk ** -0.5, anc, True, use_triton=True)
        torch.testing.assert_close(got.float(), want.float(), atol=TOL[dt] * 2, rtol=TOL[dt] * 2)
        if DEV.type == "cuda":   # the launch was chosen by timing, and the choice is recorded
            assert any(k.startswith(f"attention rows={n} ") for k in fd.tuning_record())


@needs_triton
@pytest.mark.parametrize("split", [0, 2])
def test_fast_decoder_on_the_kernels_computes_decode_step(split):
    from mqa_repro.bench import BenchConfig, build_model, check_fast_path
    from mqa_repro.spec import load_spec

    v = load_spec(EXPERIMENTS / "tiny.yaml").variants["multi_query"]
    model = build_model(v, DEV, "fp32")
    assert fd.FastDecoder(model).fused
    cfg = BenchConfig(batch=2, src_len=6, tgt_len=10, beams=[1, 2], repeats=1, dtype="fp32", device=DEV.type)
    r = check_fast_path(v, model, cfg, DEV, beam=2, batch=2, split=split)
    assert r["logits_rel_err_max"] < 1e-4
    assert r["greedy_token_agreement_with_model"] == 1.0
    assert r["beam2_sentences_equal_reference"] == 1.0
    if DEV.type == "cuda":
        assert r["greedy_graph_equals_eager"] and r["beam2_graph_equals_eager"]
