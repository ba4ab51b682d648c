"""``mqa-repro run``: prepare -> train -> evaluate -> bench -> report, skipping what is already done.

A stage is skipped for a run when its output exists for the same inputs: the prepared data when its
manifest matches (``prepare`` decides), training when the run's manifest says ``finished`` for the same
resolved-spec hash, evaluation when ``metrics.json`` was computed from that spec hash at the final
checkpoint step, the benchmark when its JSON holds the same spec hashes. Several small variants can
train side by side (``--jobs``): each is its own ``mqa-repro train`` process.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from .errors import UserError
from .spec import Spec

STAGES = ("prepare", "train", "evaluate", "bench", "report")


def parse_stages(text: str) -> list:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    for s in stages:
        if s not in STAGES:
            raise UserError(f"--stages: unknown stage {s!r}; choose from {', '.join(STAGES)}")
    return stages


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def training_done(run_dir: Path, variant) -> bool:
    man = _read(run_dir / "manifest.json")
    return bool(man and man.get("status") == "finished" and man.get("spec_hash") == variant.hash
                and man.get("checkpoint_step") == variant.training.steps)


def evaluation_done(run_dir: Path, variant) -> bool:
    met = _read(run_dir / "metrics.json")
    return bool(met and met.get("spec_hash") == variant.hash and met.get("checkpoint_step") == variant.training.steps)


def bench_done(path: Path, variants: list) -> bool:
    res = _read(path)
    return bool(res and res.get("spec_hashes") == {v.name: v.hash for v in variants})


def _train_in_subprocesses(todo: list, spec_path: str, jobs: int, device: str, data: Optional[str],
                           results: Path, checkpoints: Path, say: Callable) -> None:
    """Up to ``jobs`` concurrent ``mqa-repro train`` processes, one per (variant, seed)."""
    pending, running, failed = list(todo), [], []
    logs_dir = results / ".logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < jobs:
            v, seed, resume = pending.pop(0)
            cmd = [sys.executable, "-m", "mqa_repro", "train", spec_path, "--variant", v.name, "--seed", str(seed),
                   "--device", device, "--out", str(results), "--checkpoints", str(checkpoints)]
            if resume:
                cmd.append("--resume")
            if data:
                cmd += ["--data", data]
            log = open(logs_dir / f"train.{v.spec_name}.{v.name}.seed{seed}.log", "w")
            running.append((v, seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
            say(f"train {v.name} seed {seed}: started (log {log.name})")
        time.sleep(0.5)
        for item in list(running):
            v, seed, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode == 0:
                say(f"train {v.name} seed {seed}: finished")
            else:
                tail = Path(log.name).read_text(errors="replace").strip().splitlines()[-1:]
                failed.append(f"{v.name} seed {seed} ({tail[0] if tail else 'no output'})")
    if failed:
        raise UserError(f"training failed for {'; '.join(failed)}; logs are in {logs_dir}")


def run_pipeline(spec: Spec, *, stages=STAGES, variants: Optional[list] = None, seeds: int = 1, jobs: int = 1,
                 device: str = "auto", data_dir=None, results="results", checkpoints="checkpoints",
                 progress: bool = True, say: Callable = print) -> Optional[str]:
    """Run the stages for the chosen variants and seeds; returns the report text when it ran."""
    from .data import prepare, prepared_dir

    chosen = spec.select(variants)
    results, checkpoints = Path(results), Path(checkpoints)
    if seeds < 1:
        raise UserError("--seeds must be at least 1")
    if jobs < 1:
        raise UserError("--jobs must be at least 1")
    data_path = None
    if "prepare" in stages:
        res = prepare(spec, data_dir=data_dir, progress=progress)
        data_path = Path(res.path) if hasattr(res, "path") else prepared_dir(spec)
    runs = [(v, chosen[0].training.seed + s) for v in chosen for s in range(seeds)]

    if "train" in stages:
        from .train import checkpoint_dir, run_dir, train_variant, CHECKPOINT_NAME

        todo = []
        for v, seed in runs:
            rd = run_dir(v, seed, results)
            if training_done(rd, v):
                say(f"train {v.name} seed {seed}: up to date, skipped")
                continue
            resume = (checkpoint_dir(v, seed, checkpoints) / CHECKPOINT_NAME).is_file()
            todo.append((v, seed, resume))
        if jobs > 1 and len(todo) > 1:
            _train_in_subprocesses(todo, spec.path, jobs, device, str(data_path) if data_path else None,
                                   results, checkpoints, say)
        else:
            for v, seed, resume in todo:
                say(f"train {v.name} seed {seed}" + (" (resuming)" if resume else ""))
                train_variant(v, seed, device=device, resume=resume, out_root=results, checkpoint_root=checkpoints,
                              data=data_path, progress=progress)

    if "evaluate" in stages:
        from .evaluate import evaluate_run
        from .train import run_dir

        for v, seed in runs:
            rd = run_dir(v, seed, results)
            if evaluation_done(rd, v):
                say(f"evaluate {v.name} seed {seed}: up to date, skipped")
                continue
            if not training_done(rd, v):
                raise UserError(f"cannot evaluate {rd}: its training has not finished (run the train stage)")
            say(f"evaluate {v.name} seed {seed}")
            evaluate_run(rd, device=device, progress=progress, data=data_path)

    if "bench" in stages:
        from .bench import default_config, run_bench
        from .provenance import write_json_atomic
        from .runtime import resolve_device

        dev = resolve_device(device)
        out = results / spec.name / "bench" / f"{dev.type}.json"
        if bench_done(out, chosen):
            say(f"bench: up to date ({out}), skipped")
        else:
            say(f"bench on {dev.type}: {', '.join(v.name for v in chosen)}")
            res = run_bench(chosen, default_config(chosen[0], dev), spec_path=spec.path)
            write_json_atomic(out, res)

    if "report" in stages:
        from .report import report

        text, _ = report(results / spec.name, "md")
        return text
    return None
