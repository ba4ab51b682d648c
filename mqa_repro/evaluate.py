"""Evaluation: the paper's protocol on a trained run.

Translation: ln(perplexity) per target subword token (EOS included) on dev and every test set; BLEU with
sacrebleu, every tokenizer of ``evaluation.bleu_tokenizers`` (``intl`` as the paper, ``13a`` alongside),
each with its full signature: dev with greedy decoding, each test set with every beam of
``evaluation.beams`` (beam 1 is greedy) and the paper's length penalty. Decode limit per sentence:
min(max_len_cap, max_len_a * source length + max_len_b) (decode.max_lengths; the source as the encoder
sees it, EOS included), never beyond model.max_positions. Decoding runs on the engine (mqa_repro.decode).

The detokenized hypotheses are written one line per source sentence (``hyp.<split>.beam<k>.txt``) beside
the references they were scored against (``ref.<split>.txt``), so that
``sacrebleu ref.<split>.txt -i hyp.<split>.beam<k>.txt -tok intl`` reproduces every number.

Language models: perplexity per subword token and per whitespace word (each sentence's EOS counts as a
word, as in LM1B's convention) on dev and test.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import torch

from .errors import UserError
from .provenance import manifest, now, write_json_atomic
from .train import (Examples, corpus_nll, load_checkpoint, load_examples, model_from_checkpoint,
                    open_prepared, data_fingerprint, resolve_device)


def _progress(total: int, title: str, enabled: bool):
    """A rich bar on a terminal (returns (advance, close)); nothing when piped."""
    if not (enabled and sys.stderr.isatty()):
        return (lambda n: None), (lambda: None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar.start()
    task = bar.add_task(title, total=total)
    return (lambda n: bar.advance(task, n)), bar.stop


def _say(text: str, enabled: bool) -> None:
    if enabled:
        print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Decoding a split
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def translate(model, ex: Examples, ev, beam: int, batch_size: int, device, advance=None, engine=None,
              vocab_limit=None) -> list:
    """Token ids of the best hypothesis for every source sentence, in the split's order (EOS removed).

    Decoded by the engine (:class:`mqa_repro.decode.Engine`; pass ``engine`` to reuse its captured graphs):
    sentences sorted by source length, at least ``batch_size`` per batch.
    """
    from .decode import Engine

    if engine is None:
        engine = Engine(model, vocab_limit=vocab_limit)
    if not len(ex):
        return []
    tokens = max(1, batch_size) * int(ex.src_lens.max())
    return engine.translate(ex.src, beam=beam, alpha=ev.length_penalty, max_len_a=ev.max_len_a,
                            max_len_b=ev.max_len_b, max_len_cap=ev.max_len_cap, batch_tokens=tokens,
                            progress=advance)


def bleu_scores(hyps: list, refs: list, tokenizers) -> dict:
    """sacrebleu corpus BLEU per tokenizer: {tok: {"score", "signature", "verbose"}}."""
    from sacrebleu.metrics import BLEU

    out = {}
    for tok in tokenizers:
        bleu = BLEU(tokenize=tok)
        s = bleu.corpus_score(hyps, [refs])
        out[tok] = {"score": s.score, "signature": str(bleu.get_signature()), "verbose": str(s)}
    return out


# --------------------------------------------------------------------------------------------------
# A run directory
# --------------------------------------------------------------------------------------------------
def _read_manifest(run_dir: Path) -> dict:
    import json

    p = run_dir / "manifest.json"
    if not run_dir.is_dir():
        raise UserError(f"no run directory at {run_dir}")
    if not p.is_file():
        raise UserError(f"{run_dir} has no manifest.json; is it a run directory written by `mqa-repro train`?")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{p} is not valid JSON") from None


def evaluate_run(run_dir, splits=("dev", "test"), beams: Optional[list] = None, batch_size: Optional[int] = None,
                 device="auto", data: Optional[Path] = None, checkpoint: Optional[Path] = None,
                 progress: bool = True) -> dict:
    """Evaluate the checkpoint of ``run_dir``; writes metrics.json, hypotheses and manifest.json there."""
    run_dir = Path(run_dir)
    man = _read_manifest(run_dir)
    ckpt_path = Path(checkpoint) if checkpoint else Path(man.get("checkpoint", ""))
    if not man.get("checkpoint") and checkpoint is None:
        raise UserError(f"{run_dir}/manifest.json names no checkpoint; train the run first")
    if not ckpt_path.is_file():
        raise UserError(f"the checkpoint of {run_dir} is missing (expected at {ckpt_path}); "
                        f"train the run first or pass --checkpoint")
    dev = resolve_device(device) if isinstance(device, str) else device
    if dev.type == "cuda":   # decoding runs in float32; TF32 matmuls keep it fast on the GPU
        torch.backends.cuda.matmul.allow_tf32 = True
    ck = load_checkpoint(ckpt_path)
    if man.get("spec_hash") and ck.get("spec_hash") != man["spec_hash"]:
        raise UserError(f"the spec recorded in {run_dir}/manifest.json does not match the checkpoint at "
                        f"{ckpt_path} (spec hash {man['spec_hash'][:12]} vs {str(ck.get('spec_hash'))[:12]})")
    variant, model = model_from_checkpoint(ck, dev)
    ev = variant.evaluation
    beams = list(beams or ev.beams)
    bs = batch_size or ev.batch_size
    data_dir = Path(data) if data is not None else Path(man.get("data_dir", "")) if man.get("data_dir") else None
    prepared = open_prepared(variant, data_dir)
    data_hash = data_fingerprint(prepared)
    if ck.get("data_manifest_hash") and data_hash and ck["data_manifest_hash"] != data_hash:
        raise UserError(f"the prepared data at {prepared.path} is not the data the checkpoint was trained on "
                        f"(its manifest hash differs); prepare it again or pass the right --data")
    d = variant.data
    stems = []
    if "dev" in splits:
        stems.append(("dev", d.dev))
    if "test" in splits:
        stems += [("test", s) for s in d.test]
    limit = ev.max_sentences
    metrics = {"run": str(run_dir), "variant": variant.name, "spec": variant.spec_name,
               "spec_hash": variant.hash, "seed": ck["seed"], "checkpoint_step": ck["step"],
               "perplexity": {}, "bleu": []}
    translation = variant.model.kind == "encoder-decoder"
    engine = None
    if translation:
        from .decode import Engine

        engine = Engine(model)
    for role, stem in stems:
        ex = load_examples(prepared, variant, stem, limit)
        adv, close = _progress(len(ex), f"{stem} ln(ppl)", progress)
        total, count, _ = corpus_nll(model, ex, dev, batch_tokens=8192, progress=adv)
        close()
        ppl = {"role": role, "sentences": len(ex), "subword_tokens": count,
               "ln_ppl_per_subword": total / count, "ppl_per_subword": math.exp(total / count)}
        if not translation:
            words = _count_words(prepared, stem, len(ex))
            if words is not None:
                ppl.update(words=words, ln_ppl_per_word=total / words, ppl_per_word=math.exp(total / words))
            ppl["truncated_sentences"] = int(sum(len(t) >= d.max_len - 1 for t in ex.tgt))
        metrics["perplexity"][stem] = ppl
        _say(f"{stem}: ln(ppl) per subword {ppl['ln_ppl_per_subword']:.4f}", progress)
        if not translation:
            continue
        refs = prepared.text(stem, d.tgt_lang)[: len(ex)]
        ref_file = run_dir / f"ref.{stem}.txt"
        _write_lines(ref_file, refs)
        for beam in ([1] if role == "dev" else beams):
            adv, close = _progress(len(ex), f"{stem} beam {beam}", progress)
            ids = translate(model, ex, ev, beam, bs, dev, adv, engine=engine)
            close()
            hyps = [prepared.sp.decode(x) for x in ids]
            hyp_file = run_dir / f"hyp.{stem}.beam{beam}.txt"
            _write_lines(hyp_file, hyps)
            for tok, s in bleu_scores(hyps, refs, ev.bleu_tokenizers).items():
                metrics["bleu"].append({"split": stem, "role": role, "beam": beam, "tokenizer": tok,
                                        "score": s["score"], "signature": s["signature"], "verbose": s["verbose"],
                                        "hyp_file": hyp_file.name, "ref_file": ref_file.name,
                                        "sentences": len(hyps)})
                _say(f"{stem} beam {beam}: BLEU {s['score']:.2f}  {s['signature']}", progress)
    metrics["created"] = now()
    write_json_atomic(run_dir / "metrics.json", metrics)
    eval_prov = manifest(variant, ck["seed"], dev, checkpoint=str(ckpt_path.resolve()), checkpoint_step=ck["step"],
                         data_dir=str(Path(prepared.path).resolve()), data_manifest_hash=data_hash,
                         splits=[s for _, s in stems], beams=beams, batch_size=bs)
    merged = dict(man)
    merged.update({k: eval_prov[k] for k in ("spec", "spec_hash", "seed", "checkpoint", "checkpoint_step",
                                              "data_manifest_hash")})
    merged["evaluation"] = {k: v for k, v in eval_prov.items() if k not in ("spec",)}
    write_json_atomic(run_dir / "manifest.json", merged)
    return metrics


def _count_words(prepared, stem: str, n: int) -> Optional[int]:
    """Whitespace words of the raw text plus one EOS per sentence (None when the raw text is not kept)."""
    try:
        lines = prepared.text(stem, "text")[:n]
    except (FileNotFoundError, KeyError, OSError):
        return None
    return sum(len(line.split()) + 1 for line in lines)


def _write_lines(path: Path, lines: list) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line.replace("\n", " ") + "\n")
    os.replace(tmp, path)
