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
word, as in LM1B's convention) on dev and test. Evaluation text is never truncated: a line longer than
data.max_len - 1 subwords is scored in consecutive pieces (each piece starts after BOS; only the last
one predicts EOS), so the loss and the word count cover the same text; ``lines_scored_in_pieces`` counts
such lines.

Both tasks also record ``ln_ppl_per_word``: the same summed NLL (nats) divided by the whitespace words of
the text the loss covers plus one EOS per sentence (the target side for translation). Unlike ln(PPL) per
subword it does not depend on the SentencePiece model, so runs on different vocabularies compare.

Decoding never emits an id without a SentencePiece piece: the search is limited to the tokenizer's
piece count (``Prepared.piece_count``), which is below model.vocab_size when the corpus was short.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import UserError
from .provenance import manifest, now, write_json_atomic
from .runtime import Progress, resolve_device
from .textio import as_sacrebleu_cli_reads, one_line, write_lines
from .batching import Examples, data_fingerprint, load_examples, open_prepared
from .checkpoint import load_checkpoint, model_from_checkpoint
from .perplexity import corpus_nll


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
    sentences sorted by source length, at least ``batch_size`` per batch: batches of at most ``batch_size``
    times the longest source rounded up to the engine's length bucket, so that splits of similar lengths
    are cut into batches of the same shapes and share the engine's CUDA graphs.
    """
    from .decode import Engine
    from .decode.engine import bucket

    if engine is None:
        engine = Engine(model, vocab_limit=vocab_limit)
    if not len(ex):
        return []
    tokens = max(1, batch_size) * bucket(int(ex.src_lens.max()))
    return engine.translate(ex.src, beam=beam, alpha=ev.length_penalty, max_len_a=ev.max_len_a,
                            max_len_b=ev.max_len_b, max_len_cap=ev.max_len_cap, batch_tokens=tokens,
                            progress=advance)


def bleu_scores(hyps: list, refs: list, tokenizers) -> dict:
    """sacrebleu corpus BLEU per tokenizer: {tok: {"score", "signature", "verbose"}}.

    Scored on the lines as ``sacrebleu REF -i HYP`` reads them back from the written files
    (:func:`mqa_repro.textio.as_sacrebleu_cli_reads`), so that command reproduces every number."""
    from sacrebleu.metrics import BLEU

    hyps, refs = as_sacrebleu_cli_reads(hyps), as_sacrebleu_cli_reads(refs)
    out = {}
    for tok in tokenizers:
        bleu = BLEU(tokenize=tok)
        s = bleu.corpus_score(hyps, [refs])
        out[tok] = {"score": s.score, "signature": str(bleu.get_signature()), "verbose": str(s)}
    return out


# --------------------------------------------------------------------------------------------------
# A run directory
# --------------------------------------------------------------------------------------------------
def read_run_manifest(run_dir: Path) -> dict:
    """A run folder's manifest.json as a dict; UserError (naming the file) when the folder, the file or an
    object in it is missing, or it is not valid JSON."""
    import json

    p = run_dir / "manifest.json"
    if not run_dir.is_dir():
        raise UserError(f"no run directory at {run_dir}")
    if not p.is_file():
        raise UserError(f"{run_dir} has no manifest.json; is it a run directory written by `mqa-repro train`?")
    try:
        man = json.loads(p.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{p} is not valid JSON") from None
    if not isinstance(man, dict):
        raise UserError(f"{p} holds a JSON {type(man).__name__}, not a run's manifest (an object)")
    return man


def evaluation_settings(variant) -> dict:
    """The evaluation settings that change a number (not which numbers exist: beams, tokenizers; nor the
    batch size): scores computed under other settings are not merged with these."""
    ev = variant.evaluation
    return {"max_sentences": ev.max_sentences, "length_penalty": ev.length_penalty, "max_len_a": ev.max_len_a,
            "max_len_b": ev.max_len_b, "max_len_cap": ev.max_len_cap}


def required_scores(variant) -> tuple:
    """What a complete evaluation of ``variant`` holds: (perplexity split stems, {(split, beam, tokenizer)}).

    Translation: dev greedy and every test set with every beam of evaluation.beams, each with every
    tokenizer of evaluation.bleu_tokenizers; language models: perplexity on dev and every test set."""
    d, ev = variant.data, variant.evaluation
    stems = [d.dev, *d.test]
    bleu = set()
    if variant.model.is_seq2seq:
        bleu = {(d.dev, 1, tok) for tok in ev.bleu_tokenizers}
        bleu |= {(stem, beam, tok) for stem in d.test for beam in ev.beams for tok in ev.bleu_tokenizers}
    return stems, bleu


def missing_scores(metrics, variant) -> Optional[list]:
    """What ``variant``'s spec asks for that ``metrics`` (a metrics.json dict) lacks: a list of short names
    (empty: complete), or None when the metrics are not of this training, final step or settings."""
    if not isinstance(metrics, dict) or metrics.get("checkpoint_step") != variant.training.steps:
        return None
    if "training_hash" in metrics:
        if (metrics["training_hash"] != variant.training_hash
                or metrics.get("evaluation_settings") != evaluation_settings(variant)):
            return None
    elif metrics.get("spec_hash") != variant.hash:   # written before training hashes: the same whole spec
        return None
    stems, bleu = required_scores(variant)
    have_ppl = metrics.get("perplexity") if isinstance(metrics.get("perplexity"), dict) else {}
    have_bleu = {(b.get("split"), b.get("beam"), b.get("tokenizer"))
                 for b in metrics.get("bleu") or [] if isinstance(b, dict)}
    return ([f"{s} perplexity" for s in stems if s not in have_ppl]
            + [f"{s} BLEU beam {k} {t}" for s, k, t in sorted(bleu - have_bleu, key=str)])


def _merge(old, new: dict) -> dict:
    """``new`` scores over ``old`` ones of the same checkpoint, data and settings (a split, beam and
    tokenizer computed again replaces its old entry); anything else in ``old`` is dropped."""
    same = (isinstance(old, dict)
            and all(old.get(k) == new[k] for k in ("training_hash", "checkpoint_step", "data_manifest_hash",
                                                     "evaluation_settings", "seed")))
    if not same:
        return new
    out = dict(new)
    ppl = dict(old.get("perplexity") or {})
    ppl.update(new["perplexity"])
    out["perplexity"] = ppl
    fresh = {(b["split"], b["beam"], b["tokenizer"]) for b in new["bleu"]}
    out["bleu"] = [b for b in old.get("bleu") or [] if isinstance(b, dict)
                   and (b.get("split"), b.get("beam"), b.get("tokenizer")) not in fresh] + new["bleu"]
    return out


def evaluate_run(run_dir, splits=("dev", "test"), beams: Optional[list] = None, batch_size: Optional[int] = None,
                 device="auto", data: Optional[Path] = None, checkpoint: Optional[Path] = None,
                 progress: bool = True, variant=None) -> dict:
    """Evaluate the checkpoint of ``run_dir``; writes metrics.json, hypotheses and manifest.json there.

    The scores are merged into metrics.json (atomically): a split, beam and tokenizer computed now replaces
    its old entry, the others are kept when they were computed from the same checkpoint, data and
    evaluation settings (:func:`evaluation_settings`). Returns the scores computed by this call.
    ``variant``: the evaluation settings to use (``mqa-repro run`` passes the spec's; its training hash must
    match the checkpoint's); default the spec recorded in the run's manifest.
    One process at a time per run folder (runlock.py): UserError when another holds it."""
    from .runlock import own

    run_dir = Path(run_dir)
    read_run_manifest(run_dir)
    with own(run_dir, command="mqa-repro evaluate"):
        return _evaluate_run(run_dir, splits, beams, batch_size, device, data, checkpoint, progress, variant)


def _evaluate_run(run_dir, splits, beams, batch_size, device, data, checkpoint, progress, variant) -> dict:
    """evaluate_run under the run's lock: load, check the data, score every split, write."""
    man = read_run_manifest(run_dir)
    ckpt_path, dev, ck, ck_th, model, variant = _load_run(run_dir, man, checkpoint, device, variant)
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
    metrics = {"run": str(run_dir), "variant": variant.name, "spec": variant.spec_name,
               "spec_hash": variant.hash, "training_hash": ck_th, "seed": ck["seed"],
               "checkpoint_step": ck["step"], "training_steps": variant.training.steps,
               "data_manifest_hash": data_hash, "tokenizer": prepared.tokenizer(),
               "evaluation_settings": evaluation_settings(variant),
               "perplexity": {}, "bleu": []}
    engine = None
    if variant.model.is_seq2seq:
        from .decode import Engine

        engine = Engine(model, vocab_limit=prepared.piece_count)
        for beam in beams:
            engine.check_beam(beam)     # before the perplexities, not after them
    for role, stem in stems:
        ex = load_examples(prepared, variant, stem, ev.max_sentences)
        metrics["perplexity"][stem] = _perplexity(model, prepared, variant, role, stem, ex, dev, progress)
        if engine is not None:
            metrics["bleu"] += _bleu(model, engine, prepared, variant, run_dir, role, stem, ex,
                                     [1] if role == "dev" else beams, bs, dev, progress)
    _write_results(run_dir, man, metrics, variant, ck, ck_th, dev, ckpt_path, prepared, data_hash,
                   [s for _, s in stems], beams, bs)
    return metrics


def _load_run(run_dir: Path, man: dict, checkpoint, device, variant) -> tuple:
    """The run's checkpoint, checked against its manifest and ``variant``: (checkpoint path, device,
    checkpoint dict, its training hash, model, the variant whose evaluation settings apply).
    UserError when the checkpoint is missing or was trained with another spec."""
    from .spec import Variant
    from .checkpoint import checkpoint_training_hash

    ckpt_path = Path(checkpoint) if checkpoint else Path(man.get("checkpoint", ""))
    if not man.get("checkpoint") and checkpoint is None:
        raise UserError(f"{run_dir}/manifest.json names no checkpoint; train the run first")
    if checkpoint is not None and not ckpt_path.is_file():
        raise UserError(f"--checkpoint {ckpt_path}: no such file")
    if not ckpt_path.is_file():
        raise UserError(f"the checkpoint of {run_dir} is missing (expected at {ckpt_path}); "
                        f"train the run first or pass --checkpoint")
    dev = resolve_device(device) if isinstance(device, str) else device
    if dev.type == "cuda":   # decoding runs in float32; TF32 matmuls keep it fast on the GPU
        torch.backends.cuda.matmul.allow_tf32 = True
        from .decode.warmup import start_warm_up

        # Triton's start-up and cuBLAS's first float32 products, behind the checkpoint's loading and the
        # perplexities
        start_warm_up(dev, torch.float32)
    ck = load_checkpoint(ckpt_path)
    ck_th = checkpoint_training_hash(ck)
    recorded = None       # the run's spec as its manifest records it (evaluation settings may be newer)
    if isinstance(man.get("spec"), dict):
        try:
            recorded = Variant.from_dict(man["spec"], source=str(run_dir / "manifest.json"))
        except Exception:  # noqa: BLE001 - an older schema: the checkpoint's spec is used
            recorded = None
    if man.get("spec_hash") and ck.get("spec_hash") != man["spec_hash"] and not (
            recorded is not None and recorded.hash == man["spec_hash"] and recorded.training_hash == ck_th):
        raise UserError(f"the spec recorded in {run_dir}/manifest.json does not match the checkpoint at "
                        f"{ckpt_path} (spec hash {man['spec_hash'][:12]} vs {str(ck.get('spec_hash'))[:12]})")
    trained, model = model_from_checkpoint(ck, dev)
    if variant is not None and variant.training_hash != ck_th:
        raise UserError(f"the checkpoint at {ckpt_path} was trained with another spec than "
                        f"{variant.spec_name}/{variant.name} (training sections differ); train it again")
    if variant is None:
        variant = recorded if recorded is not None and recorded.training_hash == ck_th else trained
    return ckpt_path, dev, ck, ck_th, model, variant


def _perplexity(model, prepared, variant, role: str, stem: str, ex, dev, progress: bool) -> dict:
    """ln(perplexity) of split ``stem`` (its examples ``ex``) per subword, and per word where the raw text
    is kept; a language model's long lines are scored in pieces (:func:`_lm_pieces`)."""
    d = variant.data
    translation = variant.model.is_seq2seq
    if translation:
        scored, eos_scored, n_pieced = ex, None, 0
        words = _target_words(prepared, stem, d.tgt_lang, ex, d.max_len - 1)
    else:   # whole lines, the long ones in pieces: the loss covers every subword of the text
        scored, eos_scored, n_pieced = _lm_pieces(prepared.split(stem, "text"), len(ex), d.max_len - 1)
        words = _count_words(prepared, stem, len(ex))
    with Progress(f"{stem} ln(ppl)", len(scored), enabled=progress) as bar:
        total, count, _ = corpus_nll(model, scored, dev, batch_tokens=8192, progress=bar.advance,
                                     eos_scored=eos_scored)
    ppl = {"role": role, "sentences": len(ex), "subword_tokens": count,
           "ln_ppl_per_subword": total / count, "ppl_per_subword": math.exp(total / count),
           "nll_nats": total}
    if words is not None:
        ppl.update(words=words, ln_ppl_per_word=total / words, ppl_per_word=math.exp(total / words))
    if not translation:
        ppl["lines_scored_in_pieces"] = n_pieced
    _say(f"{stem}: ln(ppl) per subword {ppl['ln_ppl_per_subword']:.4f}", progress)
    return ppl


def _bleu(model, engine, prepared, variant, run_dir: Path, role: str, stem: str, ex, beams: list, bs: int, dev,
          progress: bool) -> list:
    """Translate split ``stem`` with each beam, write ref/hyp files, and return one BLEU entry per beam and
    tokenizer (sacrebleu score, signature, files)."""
    ev, d = variant.evaluation, variant.data
    refs = prepared.text(stem, d.tgt_lang)[: len(ex)]
    ref_file = run_dir / f"ref.{stem}.txt"
    write_lines(ref_file, refs)
    out = []
    for beam in beams:
        with Progress(f"{stem} beam {beam}", len(ex), enabled=progress) as bar:
            ids = translate(model, ex, ev, beam, bs, dev, bar.advance, engine=engine)
        hyps = [one_line(prepared.sp.decode(x)) for x in ids]
        hyp_file = run_dir / f"hyp.{stem}.beam{beam}.txt"
        write_lines(hyp_file, hyps)
        for tok, s in bleu_scores(hyps, refs, ev.bleu_tokenizers).items():
            out.append({"split": stem, "role": role, "beam": beam, "tokenizer": tok,
                        "score": s["score"], "signature": s["signature"], "verbose": s["verbose"],
                        "hyp_file": hyp_file.name, "ref_file": ref_file.name,
                        "sentences": len(hyps)})
            _say(f"{stem} beam {beam}: BLEU {s['score']:.2f}  {s['signature']}", progress)
    return out


def _write_results(run_dir: Path, man: dict, metrics: dict, variant, ck: dict, ck_th: str, dev, ckpt_path: Path,
                   prepared, data_hash, stems: list, beams: list, bs: int) -> None:
    """Merge ``metrics`` into metrics.json (:func:`_merge`) and record the evaluation in manifest.json."""
    metrics["created"] = now()
    old = None
    if (run_dir / "metrics.json").is_file():
        import json

        try:
            old = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        except ValueError:
            old = None   # unreadable: replaced by what was computed now
    write_json_atomic(run_dir / "metrics.json", _merge(old, metrics))
    eval_prov = manifest(variant, ck["seed"], dev, checkpoint=str(ckpt_path.resolve()), checkpoint_step=ck["step"],
                         data_dir=str(Path(prepared.path).resolve()), data_manifest_hash=data_hash,
                         tokenizer=prepared.tokenizer(), splits=stems, beams=beams,
                         batch_size=bs)
    merged = dict(man)
    merged.update({k: eval_prov[k] for k in ("spec", "spec_hash", "seed", "checkpoint", "checkpoint_step",
                                              "data_manifest_hash", "tokenizer")})
    merged["training_hash"] = ck_th
    merged["evaluation"] = {k: v for k, v in eval_prov.items() if k not in ("spec",)}
    write_json_atomic(run_dir / "manifest.json", merged)


def _lm_pieces(arr, n: int, max_ids: int) -> tuple:
    """The first ``n`` lines of an LM split as Examples of at most ``max_ids`` ids each: a longer line becomes
    consecutive pieces, every id in exactly one. Returns (examples, eos_scored [pieces] bool: true on the
    last piece of each line only, number of lines that needed more than one piece)."""
    pieces, last, n_pieced = [], [], 0
    for i in range(min(n, len(arr))):
        ids = np.asarray(arr[i], dtype=np.int64)
        starts = range(0, max(len(ids), 1), max_ids)
        n_pieced += len(starts) > 1
        for k, a in enumerate(starts):
            pieces.append(ids[a:a + max_ids])
            last.append(k == len(starts) - 1)
    return Examples(tgt=pieces), np.asarray(last, dtype=bool), n_pieced


def _target_words(prepared, stem: str, side: str, ex: Examples, max_ids: int) -> Optional[int]:
    """Whitespace words of the target text the loss covers, plus one EOS per sentence: the raw reference
    line, or, for a target prepare cut at ``max_ids`` subwords, the text of the ids that were kept."""
    try:
        lines = prepared.text(stem, side)[: len(ex)]
    except (FileNotFoundError, KeyError, OSError):
        return None
    return sum(len((prepared.sp.decode(t.tolist()) if len(t) >= max_ids else line).split()) + 1
               for line, t in zip(lines, ex.tgt))


def _count_words(prepared, stem: str, n: int) -> Optional[int]:
    """Whitespace words of the raw text plus one EOS per sentence (None when the raw text is not kept)."""
    try:
        lines = prepared.text(stem, "text")[:n]
    except (FileNotFoundError, KeyError, OSError):
        return None
    return sum(len(line.split()) + 1 for line in lines)
