"""Where a decoder step's time goes on a GPU: per-kernel times of one greedy step at t = 64 (torch.profiler,
eager, after the launch and split choices are tuned) for multi-query and multi-head attention at the
paper's shape, and the choices the tuner made. A development tool (notes/bench.md).

    PYTHONPATH=. python3 scripts/profile_decode_step.py [--no-tune]
"""
import json
import sys

import torch

from mqa_repro.bench import build_model, random_tokens
from mqa_repro.decode import Engine, tuning_record
from mqa_repro.specfile import load_spec

spec = load_spec("experiments/wmt14_ende.yaml")
dev = torch.device("cuda")
B, S, T, AT = 1024, 128, 128, 64
tune = "--no-tune" not in sys.argv


def step_ms(fn, reps=10):
    for _ in range(3):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


for vname in ("multi_query", "multi_head"):
    v = spec.variants[vname]
    model = build_model(v, dev, "bf16")
    run = Engine(model, tune=tune, graphs=False).fixed_run(B, 1, T, random_tokens(B, S, v.model.vocab_size, dev))
    for t in (16, 48, 64, 100):   # tune every live-length bucket the profile touches
        run._step(t)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run._step(AT)
        torch.cuda.synchronize()
    print(f"{vname}: greedy step at t={AT}, eager: {step_ms(lambda: run._step(AT)):.3f} ms", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=70))
    del model, run
    torch.cuda.empty_cache()
print(json.dumps(tuning_record(), indent=1))
