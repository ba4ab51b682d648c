"""The ``decode-bench`` and ``cost-model`` commands behind the CLI: check the options, load a checkpoint,
run the fixed-shape Table 2 bench (:mod:`mqa_repro.bench`), the real test set (:mod:`mqa_repro.bench_real`)
or the analytic cost model (:mod:`mqa_repro.costmodel`), write the results and print them
(:mod:`mqa_repro.console`).

Raises :class:`~mqa_repro.errors.UserError` for an option out of range, naming the option.
"""
from __future__ import annotations

import csv
import importlib
import io
import json
import sys
from pathlib import Path
from typing import Optional

from .console import say, show_bench, show_cost_model, show_real_bench
from .errors import UserError


def _positive(pairs) -> None:
    """Each (option, values) pair: every value must be 1 or more."""
    for name, xs in pairs:
        if xs and min(xs) < 1:
            raise UserError(f"{name} must be positive, got {min(xs)}")


def _emit(format: str, doc: dict, csv_text, show) -> None:
    """Print ``doc`` as JSON (format json), ``csv_text()`` (csv), or call ``show()`` for the table."""
    if format == "json":
        print(json.dumps(doc, indent=2, default=str))
    elif format == "csv":
        sys.stdout.write(csv_text())
    else:
        show()


def decode_bench(spec: Path, variant=None, checkpoint: Optional[Path] = None, peer: Optional[str] = None,
                 real: bool = False, out_file: Optional[Path] = None, overrides=None, **options) -> None:
    """Load ``spec`` (its ``variant`` names, or the checkpoint's variant; ``overrides``: ``--set`` items
    applied to each), check the shared options, then run the real-text bench (``real``) or the fixed-shape
    one with the command's other ``options``."""
    from . import bench
    from .provenance import check_writable
    from .specfile import apply_overrides, load_spec

    s = load_spec(spec)
    variants = [apply_overrides(v, overrides) for v in s.select(variant)]
    if out_file is not None:
        check_writable(out_file, "file", "--out")
    state = None
    if checkpoint is not None:
        v, state = bench.load_checkpoint(checkpoint, variants)
        variants = [v]
    if peer not in (None, "hf", "ct2"):
        raise UserError(f"--peer must be hf or ct2, got {peer!r}")
    if peer == "ct2":
        from .peers import _ct2

        _ct2()
    run = _real if real else _fixed
    run(spec, s, variants, state, peer, out_file, **options)


def _fixed(spec, s, variants, state, peer, out_file, *, batch_size, src_len, tgt_len, beam, device, dtype, repeats,
           format, attention, tune, train, train_compile, train_fused, check, sweep, sweep_values, refresh_ceilings,
           **_real_only) -> None:
    """The Table 2 rows (or a sweep) at fixed shapes: time, write ``out_file`` (JSON, or CSV by suffix), print."""
    from . import bench
    from .provenance import write_json_atomic, write_text_atomic
    from .runtime import resolve_device

    _only_with("--real", {"--test-set": _real_only.get("test_set"), "--data": _real_only.get("data"),
                          "--max-sentences": _real_only.get("max_sentences"),
                          "--sentences-per-batch": _real_only.get("sentences_per_batch"),
                          "--peer-threads": _real_only.get("peer_threads") or None})   # 0: its default

    if attention not in ("triton", "torch"):
        raise UserError(f"--attention must be triton or torch, got {attention!r}")
    for name, x in (("--batch-size", batch_size), ("--src-len", src_len), ("--tgt-len", tgt_len),
                    ("--repeats", repeats)):
        if x is not None and x < 1:
            raise UserError(f"{name} must be positive, got {x}")
    if beam and any(k < 1 for k in beam):
        raise UserError(f"--beam must be a positive integer, got {min(beam)}")
    if peer == "hf":
        try:
            importlib.import_module("transformers")
        except ImportError:
            raise UserError("--peer hf needs Hugging Face transformers, which is not installed here "
                            "(pip install transformers)") from None
    dev = resolve_device(device)
    cfg = bench.default_config(variants[0], dev, batch=batch_size, src_len=src_len, tgt_len=tgt_len,
                               beams=sorted(set(beam)) if beam else None, repeats=repeats, dtype=dtype,
                               train=train, train_compile=train_compile, train_fused=train_fused, check=check,
                               attention=attention, tune=tune, sweep=sweep,
                               sweep_values=list(sweep_values) if sweep_values else None)
    res = bench.run_bench(variants, cfg, state, peer, spec_path=str(spec), log=say,
                          refresh_ceilings=refresh_ceilings)
    if out_file is not None:
        if out_file.suffix == ".csv":
            write_text_atomic(out_file, to_csv(res))
        else:
            write_json_atomic(out_file, res)
    _emit(format, res, lambda: to_csv(res), lambda: show_bench(res, s.name))


def _given(options: dict) -> list:
    """The names of ``options`` (name -> value) the user gave: not None and not an empty list."""
    return [name for name, x in options.items() if x not in (None, [], ())]


def _only_with(flag: str, options: dict) -> None:
    """UserError naming the given ``options`` (:func:`_given`) that only ``flag`` uses, so that none of them
    is silently ignored."""
    used = _given(options)
    if used:
        raise UserError(f"{', '.join(used)} {'goes' if len(used) == 1 else 'go'} with {flag}, which is not set")


def _real(spec, s, variants, state, peer, out_file, *, beam, device, dtype, repeats, format, test_set, data,
          max_sentences, sentences_per_batch, peer_threads, attention, tune, **_fixed_only) -> None:
    """decode-bench --real: translate a real test set (``bench_real.run_real_bench``), write, print."""
    from . import bench_real
    from .runtime import resolve_device

    if peer == "hf":
        raise UserError("--peer hf times fixed shapes only (Marian on random weights); use --peer ct2 with --real")
    used = _given({"--batch-size": _fixed_only.get("batch_size"), "--src-len": _fixed_only.get("src_len"),
                   "--tgt-len": _fixed_only.get("tgt_len"), "--sweep": _fixed_only.get("sweep"),
                   "--sweep-value": _fixed_only.get("sweep_values")})
    if used:
        raise UserError(f"{', '.join(used)} set{'s' if len(used) == 1 else ''} the fixed-shape rows, which --real "
                        f"does not time (--real takes --sentences-per-batch and the test set's own lengths)")
    if _fixed_only.get("train_compile") is not None or _fixed_only.get("train_fused") is not None:
        raise UserError("--compile/--no-compile and --fused-optimizer/--plain-optimizer set up the training row, "
                        "which --real does not time")
    _positive((("--max-sentences", [max_sentences] if max_sentences is not None else []),
               ("--sentences-per-batch", sentences_per_batch or []), ("--repeats", [repeats] if repeats else []),
               ("--beam", beam or [])))
    dev = resolve_device(device)
    v0 = variants[0]
    cfg = bench_real.RealConfig(
        device=dev.type, dtype=dtype or ("fp32" if dev.type == "cpu" else v0.benchmark.dtype),
        beams=sorted(set(beam)) if beam else list(v0.benchmark.beams),
        batches=list(dict.fromkeys(sentences_per_batch)) if sentences_per_batch else list(bench_real.DEFAULT_BATCHES),
        repeats=repeats or min(v0.benchmark.repeats, 3), stem=test_set, max_sentences=max_sentences,
        peer_threads=peer_threads)
    res = bench_real.run_real_bench(variants, cfg, state, peer, data=data, spec_path=str(spec),
                                    use_triton=(attention == "triton") if dev.type == "cuda" else None, tune=tune,
                                    log=say, out_file=out_file)   # written after every finished row
    if format != "table":
        if format == "csv":
            raise UserError("--real writes table or json; --format csv is for the Table 2 rows")
        print(json.dumps(res, indent=2, default=str))
        return
    show_real_bench(res, s.name, cfg.dtype)


def cost_model(spec: Path, variant, device: Optional[str], bandwidth: Optional[float], flops: Optional[float],
               memory_gb: Optional[float], batch, context, src_len: Optional[int], beam: int, chips: int,
               format: str, out_file: Optional[Path], refresh_ceilings: bool) -> None:
    """``cost-model``: check the options, evaluate ``costmodel.cost_model`` over the grid, write, print."""
    from . import costmodel as cm
    from .provenance import check_writable, write_json_atomic
    from .specfile import load_spec

    s = load_spec(spec)
    variants = s.select(variant)
    if out_file is not None:
        check_writable(out_file, "file", "--out")
    _positive((("--batch", batch), ("--context", context), ("--beam", [beam]), ("--chips", [chips])))
    if src_len is not None and src_len < 1:
        raise UserError(f"--src-len must be positive, got {src_len}")
    if src_len is not None and not variants[0].model.is_seq2seq:
        raise UserError(f"--src-len applies to encoder-decoder models; {spec} is decoder-only")
    dev = cm.device_preset(device, bandwidth, flops, memory_gb, refresh_ceilings, log=say)
    bench_cfg = variants[0].benchmark
    res = cm.cost_model(variants, dev, sorted(set(batch or [bench_cfg.batch_size])),
                        sorted(set(context or [bench_cfg.tgt_len])), src_len, beam, chips)
    doc = cm.to_document(res, variants, spec_path=str(spec)) if (out_file or format == "json") else None
    if out_file is not None:
        write_json_atomic(out_file, doc)
    _emit(format, doc, lambda: cm.to_csv(res),
          lambda: show_cost_model(res, s.name, dev, variants[0].model.is_seq2seq, src_len, beam, chips))


CSV_FIELDS = ["variant", "measure", "beam", "batch", "src_len", "tgt_len", "dtype", "us_per_token",
              "us_per_token_min", "us_per_token_max", "us_per_hyp_token", "bound_us_per_token", "x_bound",
              "mbu", "mfu", "kv_cache_bytes", "kv_bytes_moved", "bytes", "flops", "median_s", "repeats", "sweep",
              "spread", "noisy"]


def to_csv(res: dict) -> str:
    """The rows of a decode-bench result ``res`` as CSV (the columns of ``CSV_FIELDS``)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in res["rows"]:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()
