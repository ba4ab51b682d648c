"""Can memory-bound attention overlap compute-bound products? The greedy decoder at the paper's shape with
the batch split over 1, 2 or 4 CUDA streams, while cuBLASLt products are limited to all but ``carveout``
SMs (torch._C._set_sm_carveout_experimental), so one stream's attention can run beside another's
products. A development experiment (notes/bench.md); prints µs per output token, median of 5.

    PYTHONPATH=. python3 scripts/overlap_experiment.py
"""
import torch

from mqa_repro.bench import _chunks, build_model, random_tokens, time_runs
from mqa_repro.fastdecode import DecodeRun, FastDecoder
from mqa_repro.spec import load_spec

spec = load_spec("experiments/wmt14_ende.yaml")
dev = torch.device("cuda")
B, S, T = 1024, 128, 128
CONFIGS = [(1, 0), (2, 0), (2, 16), (2, 32), (2, 48), (4, 32)]

for vname in ("multi_query", "multi_head"):
    v = spec.variants[vname]
    model = build_model(v, dev, "bf16")
    fast = FastDecoder(model)
    cross = fast.encode(random_tokens(B, S, v.model.vocab_size, dev))
    for streams, carve in CONFIGS:
        torch._C._set_sm_carveout_experimental(carve or None)
        chunks = _chunks(fast, cross, B, 1, T, streams)
        run = DecodeRun(fast, chunks, T, graphs=True)
        times = sorted(time_runs(run.run, dev, 5, before=run.reset))
        print(f"{vname} streams={streams} carveout={carve}: {times[2] * 1e6 / (B * T):.4f} us/token "
              f"(min {times[0] * 1e6 / (B * T):.4f})", flush=True)
        del run, chunks
        torch.cuda.empty_cache()
    torch._C._set_sm_carveout_experimental(None)
    del model, fast, cross
    torch.cuda.empty_cache()
