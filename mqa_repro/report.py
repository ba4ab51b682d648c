"""The paper's Tables 1-3 (and plots) from the files the tool wrote under ``results/``, and nothing else.

A run directory (``results/<spec>/<variant>/seed<N>/``) contributes through its ``manifest.json`` and
``metrics.json``; a decode benchmark through the JSON that ``decode-bench --out`` wrote (any ``*.json``
under the results folder whose ``kind`` is ``decode-bench``; real-sentence throughput from those whose ``kind`` is
``decode-bench-real``, written by ``decode-bench --real``). Missing numbers are shown as missing.
Runs of one variant made from different resolved specs are never averaged together: the newest spec
hash wins and the others are listed as excluded; code versions (git shas) are named in the caption.
Nor are runs of one spec made from different prepared data (another SentencePiece model or version, other
source files: the manifests' ``data_manifest_hash``) averaged or compared: the newest run's data wins and
the others are listed apart with the reason; the caption names the SentencePiece version and model hash.
Unfinished runs (status not ``finished``, or checkpoint, metrics or training log short of the spec's
``training.steps``) are listed apart with the reason, never put into a table under that step count.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import UserError
from .plots import plots
from .render import render_csv, render_json, render_latex, render_markdown
from .spec import Variant
from .tables import table1, table2, table3, table_cost_model, table_multi_gpu, table_real


# --------------------------------------------------------------------------------------------------
# Collecting
# --------------------------------------------------------------------------------------------------
@dataclass
class Run:
    dir: Path
    spec: str
    variant: str
    seed: int
    spec_hash: str
    git_sha: str
    created: str
    resolved: Variant
    metrics: Optional[dict]
    device: str
    data_hash: Optional[str] = None   # data_manifest_hash: what the prepared data is (incl. the spm model)
    tokenizer: Optional[dict] = None  # sentencepiece version, spm sha256, pieces


@dataclass
class Collection:
    root: Path
    runs: dict = field(default_factory=dict)      # spec -> variant -> [Run] (one spec hash)
    excluded: list = field(default_factory=list)  # (path, reason)
    benches: list = field(default_factory=list)   # (path, decode-bench JSON)
    multi_gpu: list = field(default_factory=list)  # (path, multi-GPU summary JSON: scripts/ddp_summary.py)
    real_benches: list = field(default_factory=list)  # (path, decode-bench --real JSON: mqa_repro.bench_real)


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return e


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _metrics_problem(m) -> Optional[str]:
    """Why a metrics.json cannot be read as ``evaluate`` writes it (None: it can)."""
    if not isinstance(m, dict):
        return f"metrics.json holds a JSON {type(m).__name__}, not an object"
    bleu = m.get("bleu", [])
    if not isinstance(bleu, list):
        return "metrics.json: 'bleu' is not a list"
    for i, b in enumerate(bleu):
        if not isinstance(b, dict):
            return f"metrics.json: BLEU entry {i + 1} is not an object"
        lacking = [k for k in ("split", "beam", "tokenizer", "score") if k not in b]
        if lacking:
            return f"metrics.json: BLEU entry {i + 1} lacks {', '.join(lacking)}"
        if not _is_num(b["score"]) or not _is_num(b["beam"]):
            return f"metrics.json: BLEU entry {i + 1} has a score or beam that is not a number"
    ppl = m.get("perplexity", {})
    if not isinstance(ppl, dict):
        return "metrics.json: 'perplexity' is not an object"
    for split, p in ppl.items():
        if not isinstance(p, dict):
            return f"metrics.json: perplexity of {split!r} is not an object"
        bad = [k for k in ("ln_ppl_per_subword", "ppl_per_subword", "ppl_per_word") if k in p and not _is_num(p[k])]
        if bad:
            return f"metrics.json: perplexity of {split!r} has {bad[0]} that is not a number"
    return None


_BENCH_ROW_KEYS = ("variant", "measure", "beam", "batch", "tgt_len", "us_per_token")


def _bench_problem(d: dict) -> Optional[str]:
    """Why a decode-bench JSON cannot make a Table 2 (None: it can)."""
    rows = d.get("rows")
    if not isinstance(rows, list):
        return "decode-bench result without a list of rows"
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            return f"decode-bench row {i + 1} is not an object"
        lacking = [k for k in _BENCH_ROW_KEYS if k not in r]
        if lacking:
            return f"decode-bench row {i + 1} lacks {', '.join(lacking)}"
        nums = ("beam", "batch", "tgt_len", "us_per_token", "bound_us_per_token", "x_bound", "us_per_hyp_token",
                "us_per_token_min", "us_per_token_max")
        bad = [k for k in nums if k in r and r[k] is not None and not _is_num(r[k])]
        if bad or not _is_num(r["us_per_token"]):
            return f"decode-bench row {i + 1} has {(bad or ['us_per_token'])[0]} that is not a number"
    for key in ("variants", "ceilings", "provenance", "config"):
        if not isinstance(d.get(key, {}), dict):
            return f"decode-bench result whose {key!r} is not an object"
    for name, vd in d.get("variants", {}).items():
        try:
            Variant.from_dict(vd)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            return f"decode-bench result whose spec of {name!r} does not load ({type(e).__name__}: {e})"
    return None


_REAL_ROW_KEYS = ("variant", "beam", "batch_sentences", "target_tokens_per_s", "us_per_token")
_REAL_ROW_NUMS = ("beam", "batch_sentences", "sentences", "target_tokens", "target_tokens_per_s", "us_per_token",
                  "sentences_per_s", "encoder_us_per_token", "decoder_us_per_token", "bound_us_per_token", "x_bound",
                  "ours_over_ct2_tokens_per_s", "median_s", "repeats")


def _real_bench_problem(d: dict) -> Optional[str]:
    """Why a ``decode-bench --real`` JSON cannot make the real-sentence throughput table (None: it can)."""
    for key in ("rows", "peers"):
        if not isinstance(d.get(key, []), list):
            return f"decode-bench-real result whose {key!r} is not a list"
    if not d.get("rows"):
        return "decode-bench-real result without rows"
    for what, items in (("row", d["rows"]), ("peer row", d.get("peers", []))):
        for i, r in enumerate(items):
            if not isinstance(r, dict):
                return f"decode-bench-real {what} {i + 1} is not an object"
            if "skipped" in r:
                continue
            lacking = [k for k in (_REAL_ROW_KEYS if what == "row" else _REAL_ROW_KEYS[:4]) if k not in r]
            if lacking:
                return f"decode-bench-real {what} {i + 1} lacks {', '.join(lacking)}"
            bad = [k for k in _REAL_ROW_NUMS if k in r and r[k] is not None and not _is_num(r[k])]
            if bad:
                return f"decode-bench-real {what} {i + 1} has {bad[0]} that is not a number"
    for key in ("provenance", "config", "test_set"):
        if d.get(key) is not None and not isinstance(d.get(key), dict):
            return f"decode-bench-real result whose {key!r} is not an object"
    return None


def collect(root) -> Collection:
    """Every finished run, decode-bench result (fixed-shape and ``--real``) and multi-GPU summary under
    ``root``; what cannot be used is listed in ``excluded`` with the reason."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory of results (run `mqa-repro train`/`evaluate` first)")
    col = Collection(root)
    by_key = defaultdict(list)
    for man_path in sorted(root.rglob("manifest.json")):
        if len(man_path.relative_to(root).parts) > 4:
            continue  # not <spec>/<variant>/seed<N>/ (e.g. the runs behind a multi-GPU summary)
        run = _read_run(man_path.parent, col.excluded)
        if run is not None:
            by_key[(run.spec, run.variant)].append(run)
    _keep_newest_spec(by_key, col)
    _keep_newest_data(col)
    _collect_results(root, col)
    return col


def _read_run(run_dir: Path, excluded: list) -> Optional[Run]:
    """The run of ``run_dir`` (manifest and metrics), or None with the reason appended to ``excluded``
    (nothing appended for a manifest that is not a run's, e.g. a prepared-data manifest)."""
    man = _load_json(run_dir / "manifest.json")
    if isinstance(man, Exception):
        excluded.append((str(run_dir), f"unreadable manifest.json ({man})"))
        return None
    if not isinstance(man, dict):
        excluded.append((str(run_dir), f"manifest.json holds a JSON {type(man).__name__}, not an object"))
        return None
    if "spec" not in man or not isinstance(man.get("spec"), dict) or "variant" not in man["spec"]:
        return None  # e.g. a prepared-data manifest
    try:
        resolved = Variant.from_dict(man["spec"])
    except Exception as e:  # noqa: BLE001 - a stale schema is reported, not fatal
        excluded.append((str(run_dir), f"spec in manifest.json does not load ({e})"))
        return None
    metrics = _read_metrics(run_dir, man, excluded)
    why = unfinished(man, metrics, resolved, run_dir)
    if why:
        excluded.append((str(run_dir), why))
        return None
    dev = man.get("device", {})
    return Run(run_dir, resolved.spec_name, resolved.name, int(man.get("seed", 0)), man.get("spec_hash", ""),
               man.get("git_sha", "unknown"), man.get("created", ""), resolved, metrics,
               dev.get("name", "?") if isinstance(dev, dict) else str(dev),
               man.get("data_manifest_hash"), man.get("tokenizer") if isinstance(man.get("tokenizer"), dict)
               else None)


def _read_metrics(run_dir: Path, man: dict, excluded: list) -> Optional[dict]:
    """The run's metrics.json, or None (none yet, or unusable: the reason appended to ``excluded``)."""
    if not (run_dir / "metrics.json").exists():
        return None
    metrics = _load_json(run_dir / "metrics.json")
    if isinstance(metrics, Exception):
        excluded.append((str(run_dir), f"unreadable metrics.json ({metrics})"))
        return None
    if _metrics_problem(metrics):
        excluded.append((str(run_dir), _metrics_problem(metrics)))
        return None
    if metrics.get("spec_hash") not in (None, man.get("spec_hash")):
        excluded.append((str(run_dir), "metrics.json was computed for another spec hash"))
        return None
    return metrics


def _keep_newest_spec(by_key: dict, col: Collection) -> None:
    """Into ``col.runs``: the runs of each (spec, variant) made from the newest run's resolved spec."""
    for (spec, variant), runs in by_key.items():
        newest = max(runs, key=lambda r: r.created).spec_hash
        keep = [r for r in runs if r.spec_hash == newest]
        for r in runs:
            if r.spec_hash != newest:
                col.excluded.append((str(r.dir), f"spec hash {r.spec_hash[:12]} differs from the newest run's "
                                                 f"{newest[:12]} for {spec}/{variant}"))
        col.runs.setdefault(spec, {})[variant] = sorted(keep, key=lambda r: r.seed)


def _keep_newest_data(col: Collection) -> None:
    """One table compares runs of one prepared data set only: the newest run's of each spec."""
    for spec, variants in col.runs.items():
        newest = max((r for rs in variants.values() for r in rs), key=lambda r: r.created)
        for variant in list(variants):
            keep = []
            for r in variants[variant]:
                if r.data_hash == newest.data_hash:
                    keep.append(r)
                else:
                    col.excluded.append((str(r.dir), f"prepared data {_data_label(r)} differs from the newest "
                                                     f"{spec} run's {_data_label(newest)}; runs of different "
                                                     f"prepared data are not compared"))
            if keep:
                variants[variant] = keep
            else:
                del variants[variant]


def _collect_results(root: Path, col: Collection) -> None:
    """Decode-bench results (fixed-shape and ``--real``) and multi-GPU summaries (any other ``*.json`` under
    ``root``) into ``col``."""
    for p in sorted(root.rglob("*.json")):
        if p.name in ("manifest.json", "metrics.json"):
            continue
        d = _load_json(p)
        if isinstance(d, Exception):   # e.g. a truncated decode-bench result: say so, never drop it silently
            col.excluded.append((str(p), f"unreadable JSON ({d})"))
        elif isinstance(d, dict) and d.get("kind") in ("decode-bench", "decode-bench-real"):
            real = d["kind"] == "decode-bench-real"
            problem = _real_bench_problem(d) if real else _bench_problem(d)
            if problem:
                col.excluded.append((str(p), problem))
            else:
                (col.real_benches if real else col.benches).append((p, d))
        elif isinstance(d, dict) and d.get("kind") == "multi-gpu":
            if all(isinstance(d.get(k, {}), dict) and all(isinstance(x, dict) for x in d.get(k, {}).values())
                   for k in ("training", "decoding")):
                col.multi_gpu.append((p, d))
            else:
                col.excluded.append((str(p), "multi-GPU summary whose training/decoding entries are not objects"))
    # decode-bench files beside a multi-GPU summary are its inputs: shown through it, not as Table 2s
    inputs = {p.parent for p, _ in col.multi_gpu}
    col.benches = [(p, d) for p, d in col.benches if p.parent not in inputs]


def _data_label(r: Run) -> str:
    """The prepared data of a run, in words: fingerprint, SentencePiece version and model hash."""
    t = r.tokenizer or {}
    spm = (f", SentencePiece {t.get('sentencepiece_version') or '?'} model {str(t.get('spm_sha256') or '?')[:12]}"
           if t else "")
    return f"{str(r.data_hash)[:12] if r.data_hash else 'unrecorded'}{spm}"


def _last_logged_step(run_dir: Path) -> Optional[int]:
    from .trainlog import read_log

    try:
        steps = [r.get("step") for r in read_log(run_dir / "train_log.jsonl")]
    except (OSError, UserError):
        return None
    steps = [s for s in steps if isinstance(s, int)]
    return max(steps) if steps else None


def unfinished(man: dict, metrics, v: Variant, run_dir: Path) -> Optional[str]:
    """Why a run has not trained all of its spec's ``training.steps`` (None when it has): its manifest's
    status or checkpoint step, the step its metrics were computed at, or its training log falls short."""
    steps = v.training.steps
    status = man.get("status")
    if status is not None and status != "finished":
        at = man.get("checkpoint_step")
        where = f"; its checkpoint is at step {at} of {steps}" if isinstance(at, int) else ""
        return f"unfinished: training status {status!r}{where} (resume it with `mqa-repro train --resume`)"
    for what, step in (("its checkpoint", man.get("checkpoint_step")),
                       ("its metrics were computed", (metrics or {}).get("checkpoint_step")
                        if isinstance(metrics, dict) else None),
                       ("its training log ends", _last_logged_step(run_dir))):
        if isinstance(step, int) and step < steps:
            return f"unfinished: {what} at step {step} of the spec's {steps}"
    return None


# --------------------------------------------------------------------------------------------------
# The tables of a collection, rendered
# --------------------------------------------------------------------------------------------------
def build_tables(col: Collection, bootstrap_samples: int = 1000) -> list:
    tables, lm = [], []   # the paper's order: Table 1, Table 2 (each with its cost model), Table 3
    for spec in sorted(col.runs):
        variants = col.runs[spec]
        any_run = next(iter(variants.values()))[0].resolved
        if any_run.model.is_seq2seq:
            tables.append(table1(spec, variants, bootstrap_samples))
        else:
            lm.append(table3(spec, variants))
    for path, bench in col.benches:
        for make in (table2, table_cost_model):
            t = make(path, bench)
            if t is not None:
                tables.append(t)
    for path, doc in col.real_benches:
        tables.append(table_real(path, doc))
    tables += lm
    for path, summary in col.multi_gpu:
        t = table_multi_gpu(path, summary)
        if t is not None:
            tables.append(t)
    return tables


def report(root, fmt: str = "md", plots_dir=None, bootstrap_samples: int = 1000, notes=None) -> tuple:
    """Render the tables of everything under ``root``; returns (text, list of plot files).

    ``notes``: a Markdown file whose text goes beneath the tables (Markdown output only): the place for
    the reader's commentary, kept apart so that re-running the report never loses it."""
    notes_text = None
    if notes is not None:
        notes = Path(notes)
        if fmt != "md":
            raise UserError("--notes goes with --format md only")
        if not notes.is_file():
            raise UserError(f"--notes: {notes} does not exist")
        notes_text = notes.read_text(encoding="utf-8")
    col = collect(root)
    tables = build_tables(col, bootstrap_samples)
    if not tables:
        raise UserError(f"{root} holds no evaluated runs and no decode-bench results to report")
    if fmt == "md":
        text = (f"# Results\n\nGenerated by `mqa-repro report` from the files under `{Path(root).as_posix()}` "
                f"alone; each caption names the runs' data, scale, device, dtype and code version.\n\n"
                + render_markdown(tables, col.excluded))
    elif fmt == "csv":
        text = render_csv(tables)
    elif fmt == "json":
        text = render_json(tables, col.excluded)
    elif fmt == "latex":
        text = render_latex(tables)
    else:
        raise UserError(f"unknown report format {fmt!r}; use md, csv, json or latex")
    written = plots(col.benches, tables, plots_dir) if plots_dir else []
    if notes_text is not None:
        text = text.rstrip("\n") + "\n\n" + notes_text.strip("\n") + "\n"
    return text, written
