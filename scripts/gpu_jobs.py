#!/usr/bin/env python3
"""Run a list of shell commands over the GPUs of one machine, several at a time on each GPU.

    python3 scripts/gpu_jobs.py JOBS_FILE --gpus 0,1,2,3 --per-gpu 3 --logs DIR

JOBS_FILE holds one job per line: ``[after PATH[,PATH...] ::] COMMAND``. A job starts only once every PATH
after ``after`` exists (e.g. the metrics.json of the run it builds on), on the GPU with the fewest running
jobs whose lock file ``DIR/gpu<N>.busy`` is absent (another program holds that GPU alone while the file
exists), with ``CUDA_VISIBLE_DEVICES`` set to that GPU. Each job's output goes to ``DIR/<n>.log``. Lines that
are blank or start with ``#`` are skipped. Exits 1 if a job failed or could never start.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def parse_jobs(text: str) -> list:
    jobs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        needs = []
        if line.startswith("after ") and " :: " in line:
            head, line = line.split(" :: ", 1)
            needs = [p for p in head[len("after "):].split(",") if p]
        jobs.append({"cmd": line, "needs": needs})
    return jobs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jobs", type=Path)
    ap.add_argument("--gpus", default="0", help="GPU indices, comma separated")
    ap.add_argument("--per-gpu", type=int, default=2, help="jobs at once on one GPU")
    ap.add_argument("--logs", type=Path, default=Path("job_logs"))
    ap.add_argument("--deadline-s", type=float, default=None, help="start no job after this many seconds")
    a = ap.parse_args()
    gpus = [int(g) for g in a.gpus.split(",") if g != ""]
    a.logs.mkdir(parents=True, exist_ok=True)
    pending = list(enumerate(parse_jobs(a.jobs.read_text())))
    running, failed, t0 = [], [], time.time()

    def say(msg):
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    say(f"{len(pending)} jobs on GPUs {gpus}, {a.per_gpu} at a time each")
    while pending or running:
        for item in list(running):
            n, job, gpu, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            ok = proc.returncode == 0
            say(f"job {n} on GPU {gpu}: {'done' if ok else f'FAILED ({proc.returncode})'}: {job['cmd'][:150]}")
            if not ok:
                failed.append(n)
        late = a.deadline_s is not None and time.time() - t0 > a.deadline_s
        if late and pending:
            say(f"deadline: {len(pending)} jobs not started")
            failed += [n for n, _ in pending]
            pending = []
        for i, (n, job) in enumerate(list(pending)):
            if not all(Path(p).exists() for p in job["needs"]):
                continue
            load = {g: sum(1 for r in running if r[2] == g) for g in gpus
                    if not (a.logs / f"gpu{g}.busy").exists()}
            free = [g for g, k in load.items() if k < a.per_gpu]
            if not free:
                break
            gpu = min(free, key=lambda g: (load[g], g))
            log = open(a.logs / f"{n}.log", "w")
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
            proc = subprocess.Popen(["bash", "-c", job["cmd"]], stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((n, job, gpu, proc, log))
            pending.remove((n, job))
            say(f"job {n} on GPU {gpu}: started: {job['cmd'][:150]}")
        if pending and not running and not any(all(Path(p).exists() for p in j["needs"]) for _, j in pending):
            busy = all((a.logs / f"gpu{g}.busy").exists() for g in gpus)
            if not busy:
                say(f"{len(pending)} jobs wait for files that no running job will write")
                failed += [n for n, _ in pending]
                pending = []
        time.sleep(1.0)
    say(f"all done; {len(failed)} failed: {failed}" if failed else "all done")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
