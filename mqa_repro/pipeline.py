"""``mqa-repro run``: prepare -> train -> evaluate -> bench -> report, skipping what is already done.

A stage is skipped for a run when its output exists for the same inputs: the prepared data when its
manifest matches (``prepare`` decides), training when the run's manifest says ``finished`` at the last
step for the same training hash (model, data and training sections: evaluation and benchmark settings may
change), evaluation when ``metrics.json`` holds every score the spec asks for (splits x beams x
tokenizers; LMs: splits) from the final checkpoint under the same evaluation settings, the benchmark when
its JSON holds the same spec hashes. Several small variants can train side by side (``--jobs``): each is
its own ``mqa-repro train`` process, killed when ``run`` stops (Linux: also when it is killed).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from .errors import ResumeError, UserError
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
    from .checkpoint import manifest_training_hash

    man = _read(run_dir / "manifest.json")
    return bool(isinstance(man, dict) and man.get("status") == "finished"
                and manifest_training_hash(man) == variant.training_hash
                and man.get("checkpoint_step") == variant.training.steps)


def evaluation_done(run_dir: Path, variant) -> bool:
    """metrics.json holds every score ``variant``'s spec asks for (evaluate.missing_scores)."""
    from .evaluate import missing_scores

    return missing_scores(_read(run_dir / "metrics.json"), variant) == []


def _die_with_parent(parent: int):
    """preexec_fn of a child process: its own process group (a terminal's Ctrl-C reaches the parent only,
    which then stops it once, see stop_children), and on Linux SIGTERM when the parent dies (even by
    SIGKILL)."""
    def set_death_signal():
        os.setpgid(0, 0)
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)     # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):              # not Linux: the parent's finally still stops it
            return
        if os.getppid() != parent:                     # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return set_death_signal


def spawn_child(cmd: list, log) -> subprocess.Popen:
    """A child process (output to ``log``) that dies with this process (see _die_with_parent)."""
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent(os.getpid()))


def stop_children(procs: list, grace: float = 30.0) -> None:
    """SIGTERM each running child (training saves a checkpoint and exits), then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def bench_done(path: Path, variants: list) -> bool:
    res = _read(path)
    return bool(res and res.get("spec_hashes") == {v.name: v.hash for v in variants})


def _train_in_subprocesses(todo: list, spec_path: str, jobs: int, device: str, data: Optional[str],
                           results: Path, checkpoints: Path, say: Callable) -> None:
    """Up to ``jobs`` concurrent ``mqa-repro train`` processes, one per (variant, seed)."""
    pending, running, failed = list(todo), [], []
    logs_dir = results / ".logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    try:
        _run_jobs(pending, running, failed, jobs, spec_path, device, data, results, checkpoints, logs_dir, say)
    finally:   # run stopped (an error, Ctrl-C): its children stop too
        stop_children([proc for _, _, proc, _ in running])
        for *_, log in running:
            log.close()
    if failed:
        raise UserError(f"training failed for {'; '.join(failed)}; logs are in {logs_dir}")


def _run_jobs(pending, running, failed, jobs, spec_path, device, data, results, checkpoints, logs_dir, say):
    while pending or running:
        while pending and len(running) < jobs:
            v, seed, resume = pending.pop(0)
            cmd = [sys.executable, "-m", "mqa_repro", "train", spec_path, "--variant", v.name, "--seed", str(seed),
                   "--device", device, "--out", str(results), "--checkpoints", str(checkpoints)]
            # the stage found this run missing or made from other inputs: a fresh start replaces what is there
            cmd.append("--resume" if resume else "--overwrite")
            if data:
                cmd += ["--data", data]
            log = open(logs_dir / f"train.{v.spec_name}.{v.name}.seed{seed}.log", "w")
            running.append((v, seed, spawn_child(cmd, log), log))
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


def run_pipeline(spec: Spec, *, stages=STAGES, variants: Optional[list] = None, seeds: int = 1, jobs: int = 1,
                 device: str = "auto", data_dir=None, results="results", checkpoints="checkpoints",
                 progress: bool = True, say: Callable = print) -> Optional[str]:
    """Run the stages for the chosen variants and seeds; returns the report text when it ran."""
    from .data import prepared_dir
    from .prepare import prepare

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
        from .checkpoint import CHECKPOINT_NAME, checkpoint_dir, run_dir
        from .train import train_variant

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
                say(f"train {v.name} seed {seed}" + (" (resuming its checkpoint)" if resume else ""))
                try:
                    train_variant(v, seed, device=device, resume=resume, out_root=results,
                                  checkpoint_root=checkpoints, data=data_path, progress=progress, overwrite=True)
                except ResumeError as e:
                    ckpt = checkpoint_dir(v, seed, checkpoints) / CHECKPOINT_NAME
                    raise UserError(f"{e.why}; run continues a checkpoint only for the spec that made it: delete "
                                    f"{ckpt} to train this spec from scratch, or pass other --results and "
                                    f"--checkpoints folders") from None

    if "evaluate" in stages:
        from .evaluate import evaluate_run
        from .checkpoint import run_dir

        for v, seed in runs:
            rd = run_dir(v, seed, results)
            if evaluation_done(rd, v):
                say(f"evaluate {v.name} seed {seed}: up to date, skipped")
                continue
            if not training_done(rd, v):
                raise UserError(f"cannot evaluate {rd}: its training has not finished (run the train stage)")
            say(f"evaluate {v.name} seed {seed}")
            evaluate_run(rd, device=device, progress=progress, data=data_path, variant=v)

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
