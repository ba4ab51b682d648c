"""``mqa-repro uptrain``: turn a trained multi-head model into one with G key/value heads, then train on.

Ainslie et al. (2023, "GQA") convert a multi-head checkpoint by mean-pooling the key and value projection
heads within each group of H/G query heads, then continue pre-training for a small fraction of the
original steps ("uptraining"). Two other initialisations are offered for comparison: the first head of
each group, and random initialisation of the new key/value projections (everything else kept).

Every attention layer is converted (encoder self-attention, decoder self-attention and encoder-decoder
attention). The feed-forward width is kept, so the uptrained model has fewer parameters than the
multi-head source (and than a from-scratch row whose ``d_ff: match`` restores the count).

Schedule: the uptraining run gets its own short schedule of the source's kind and peak learning rate,
warming up linearly over 10% of its steps (at least 1): the source's schedule has decayed to (near) zero
by its last step, and a converted model needs a real learning rate to repair the pooled projections.
Optimizer state starts fresh (the key/value projections change shape).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import torch

from .errors import UserError
from .names import METHODS, uptrain_name
from .spec import Variant

def uptrain_variant(source: Variant, kv_heads: int, method: str, *, fraction: Optional[float] = None,
                    steps: Optional[int] = None) -> Variant:
    """The target row: the source's spec with ``n_kv_heads = kv_heads`` and a short schedule of its own."""
    m, t = source.model, source.training
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if m.n_kv_heads != m.n_heads:
        raise UserError(f"uptraining starts from a multi-head run; {source.spec_name}/{source.name} has "
                        f"n_kv_heads {m.n_kv_heads} != n_heads {m.n_heads}")
    if kv_heads < 1 or kv_heads >= m.n_heads or m.n_heads % kv_heads:
        raise UserError(f"--kv-heads must divide n_heads ({m.n_heads}) and be smaller than it, got {kv_heads}")
    if (fraction is None) == (steps is None):
        raise UserError("give exactly one of --fraction and --steps")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise UserError(f"--fraction must be in (0, 1], got {fraction}")
        steps = max(1, round(fraction * t.steps))
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    name = uptrain_name(source.name, kv_heads, method, steps, t.steps)
    warmup = max(1, math.ceil(0.1 * steps))
    training = dataclasses.replace(t, steps=steps, warmup_steps=warmup,
                                   eval_every=min(t.eval_every, steps), checkpoint_every=min(t.checkpoint_every, steps),
                                   log_every=min(t.log_every, max(1, steps // 10)))
    return dataclasses.replace(source, name=name, model=dataclasses.replace(m, n_kv_heads=kv_heads),
                               training=training)


def convert_state(state: dict, source: Variant, kv_heads: int, method: str, seed: int) -> dict:
    """The source model's weights with every key/value projection reduced to ``kv_heads`` heads."""
    from .model import Transformer

    m = source.model
    target = dataclasses.replace(m, n_kv_heads=kv_heads)
    h, group = m.n_heads, target.group_size
    fresh = None
    if method == "random":
        torch.manual_seed(seed)
        fresh = Transformer(target).state_dict()
    out, converted = {}, 0
    for key, w in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            d_head = m.d_k if key.endswith("k_proj.weight") else m.d_v
            if w.shape[0] != h * d_head:
                raise UserError(f"checkpoint weight {key} has shape {tuple(w.shape)}, not that of {h} heads of "
                                f"{d_head}")
            heads = w.reshape(kv_heads, group, d_head, w.shape[1])
            if method == "mean":
                w = heads.float().mean(dim=1).to(w.dtype)
            elif method == "first":
                w = heads[:, 0]
            else:
                w = fresh[key]
            w = w.reshape(kv_heads * d_head, -1).contiguous()
            converted += 1
        out[key] = w
    if not converted:
        raise UserError("the checkpoint holds no key/value projections to convert")
    return out


def uptrain_run(run_dir, kv_heads: int, *, method: str = "mean", fraction: Optional[float] = None,
                steps: Optional[int] = None, seed: Optional[int] = None, device="auto", resume: bool = False,
                out_root="results", checkpoint_root="checkpoints", data: Optional[Path] = None,
                progress: bool = True, overwrite: bool = False):
    """Convert the run's final checkpoint and train the result; returns the TrainResult. ``overwrite``: as
    train_variant's (a folder already holding a run without a checkpoint is replaced instead of refused)."""
    from .checkpoint import load_checkpoint
    from .train import train_variant

    run_dir = Path(run_dir)
    man_path = run_dir / "manifest.json"
    if not man_path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no manifest.json); give one written by train")
    from .evaluate import read_run_manifest

    man = read_run_manifest(run_dir)
    if man.get("status") != "finished":
        raise UserError(f"{run_dir}: its training has not finished (status {man.get('status')!r}); "
                        f"uptrain from a finished run")
    ck_path = Path(man.get("checkpoint", ""))
    if not ck_path.is_file():
        raise UserError(f"{run_dir}: its checkpoint {ck_path} is missing (checkpoints are not in results/; "
                        f"uptrain where the run was trained)")
    ck = load_checkpoint(ck_path)
    source = Variant.from_dict(ck["spec"], source=str(ck_path))
    from .checkpoint import checkpoint_training_hash, manifest_training_hash

    # the manifest's evaluation settings may be newer than the checkpoint's: what training made must match
    if checkpoint_training_hash(ck) != manifest_training_hash(man) or ck["step"] != source.training.steps:
        raise UserError(f"{ck_path} is not the final checkpoint of {run_dir} (step {ck['step']} of "
                        f"{source.training.steps}, or another spec)")
    target = uptrain_variant(source, kv_heads, method, fraction=fraction, steps=steps)
    seed = int(man.get("seed", 0)) if seed is None else seed
    init = None
    if not resume:
        init = {"model": convert_state(ck["model"], source, kv_heads, method, seed),
                "provenance": {"source_run": str(run_dir), "source_checkpoint_step": ck["step"],
                               "source_spec_hash": ck["spec_hash"], "source_variant": source.name,
                               "method": method, "kv_heads": kv_heads, "steps": target.training.steps,
                               "fraction_of_source_steps": target.training.steps / source.training.steps}}
    return train_variant(target, seed, device=device, resume=resume, out_root=out_root,
                         checkpoint_root=checkpoint_root, data=data, progress=progress, init=init,
                         overwrite=overwrite), target
