"""Uptraining a multi-head model to grouped- or multi-query attention: the conversion is exact where it must
be (heads that agree within a group give the same function), the converted run trains and records where
it came from, and bad requests are one sentence."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from mqa_repro.batching import load_examples, open_prepared
from mqa_repro.errors import UserError
from mqa_repro.model import Transformer
from mqa_repro.perplexity import corpus_nll
from mqa_repro.specfile import load_spec
from mqa_repro.uptrain import convert_state, uptrain_run, uptrain_variant

from .conftest import ROOT, TINY


def _tiny():
    return load_spec(TINY).variants["multi_head"]


def test_mean_pooling_is_exact_when_the_heads_of_a_group_agree():
    v = _tiny()
    torch.manual_seed(0)
    src = Transformer(v.model).eval()
    h, g, dk = v.model.n_heads, 2, v.model.d_k
    with torch.no_grad():   # make the two heads of each group identical, in every attention layer
        for name, p in src.named_parameters():
            if name.endswith(("k_proj.weight", "v_proj.weight")):
                heads = p.view(g, h // g, dk, -1)
                heads.copy_(heads[:, :1].expand_as(heads))
    target = uptrain_variant(v, g, "mean", steps=10)
    dst = Transformer(target.model).eval()
    dst.load_state_dict(convert_state(src.state_dict(), v, g, "mean", seed=0))
    src_ids = torch.randint(4, 200, (3, 11))
    tgt_ids = torch.randint(4, 200, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(dst(tgt_ids, src_ids), src(tgt_ids, src_ids), rtol=1e-5, atol=1e-5)


def test_conversion_methods_by_hand():
    v = _tiny()
    torch.manual_seed(1)
    state = Transformer(v.model).state_dict()
    key = "decoder.0.self_attn.k_proj.weight"
    w = state[key]                                            # (4 heads x 16, 64)
    mean = convert_state(state, v, 1, "mean", seed=0)[key]
    torch.testing.assert_close(mean, w.view(4, 16, -1).mean(0))
    first = convert_state(state, v, 2, "first", seed=0)[key]
    torch.testing.assert_close(first, torch.cat([w[0:16], w[32:48]]))
    rnd = convert_state(state, v, 1, "random", seed=0)
    assert rnd[key].shape == (16, 64) and not torch.allclose(rnd[key], mean)
    q = key.replace("k_proj", "q_proj")
    assert torch.equal(rnd[q], state[q])                      # everything but K/V is kept


def test_bad_requests_are_one_sentence():
    v = _tiny()
    for kw, words in [(dict(kv_heads=3, method="mean", steps=5), "divide"),
                      (dict(kv_heads=4, method="mean", steps=5), "smaller"),
                      (dict(kv_heads=1, method="avg", steps=5), "--method"),
                      (dict(kv_heads=1, method="mean", steps=5, fraction=0.1), "exactly one"),
                      (dict(kv_heads=1, method="mean", fraction=1.5), "--fraction")]:
        kv = kw.pop("kv_heads")
        method = kw.pop("method")
        with pytest.raises(UserError, match=words):
            uptrain_variant(v, kv, method, **kw)
    mq = dataclasses.replace(v, model=dataclasses.replace(v.model, n_kv_heads=1))
    with pytest.raises(UserError, match="multi-head"):
        uptrain_variant(mq, 1, "mean", steps=5)


def test_uptrain_run_trains_and_records_its_source(tiny_run, tiny_data, tmp_path):
    r, target = uptrain_run(tiny_run.run_dir, 1, method="mean", fraction=0.05, device="cpu",
                            out_root=tmp_path / "results", checkpoint_root=tmp_path / "ckpt", data=tiny_data,
                            progress=False)
    assert target.name == "multi_head_to_kv1_mean_5pct" and r.step == 15   # 5% of 300 steps
    man = json.loads((r.run_dir / "manifest.json").read_text())
    assert man["status"] == "finished" and man["spec"]["model"]["n_kv_heads"] == 1
    assert man["init"]["source_run"] == str(tiny_run.run_dir) and man["init"]["method"] == "mean"
    assert r.dev_ln_ppl is not None

    # Mean-pooling keeps most of what the model learned: before any uptraining its dev loss is far below
    # that of the same shape with fresh key/value projections.
    from mqa_repro.checkpoint import load_checkpoint
    ck = load_checkpoint(tiny_run.checkpoint)
    dev = load_examples(open_prepared(target, tiny_data), target, target.data.dev, limit=200)

    def dev_loss(method):
        m = Transformer(target.model)
        m.load_state_dict(convert_state(ck["model"], _tiny(), 1, method, seed=0))
        total, count, _ = corpus_nll(m.eval(), dev, torch.device("cpu"))
        return total / count

    assert dev_loss("mean") < dev_loss("random") - 0.3


def test_uptrain_cli_refuses_an_unfinished_run(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"status": "training"}))
    r = subprocess.run([sys.executable, "-m", "mqa_repro", "uptrain", str(d), "--kv-heads", "1", "--fraction",
                        "0.05"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "has not finished" in r.stderr and "Traceback" not in r.stderr
