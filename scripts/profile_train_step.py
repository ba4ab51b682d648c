"""Where the training step's time goes on a GPU: per-kernel CUDA times of the step `train` runs
(mqa_repro.step.TrainStep) at decode-bench's training shape (experiments/wmt14_ende.yaml: 128 rows of 256
target and 256 source tokens, bf16 autocast), after its warm-up. A development tool (notes/training-speed.md).

    PYTHONPATH=. python3 scripts/profile_train_step.py [--variant multi_head] [--no-compile] [--steps 3]
        [--micro-tokens N] [--sdpa auto|cudnn|efficient|flash|math] [--no-masks]

``--sdpa`` leaves only that SDPA backend on (torch.backends.cuda flags, before compiling); ``--no-masks``
drops every attention mask (a timing bound only: what attention would cost without masks, not the model).
"""
import argparse

import torch

from mqa_repro.bench import build_model, random_tokens
from mqa_repro.model import BOS
from mqa_repro.optim import build_optimizer, lr_at
from mqa_repro.specfile import load_spec
from mqa_repro.step import Batch, StepOptions, TrainStep

ap = argparse.ArgumentParser()
ap.add_argument("--variant", default="multi_head")
ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--rows", type=int, default=40)
ap.add_argument("--micro-tokens", type=int, default=None, help="override training.micro_batch_tokens")
ap.add_argument("--sdpa", default="auto", choices=["auto", "cudnn", "efficient", "flash", "math"])
ap.add_argument("--no-masks", action="store_true", help="timing bound: attention without masks")
ap.add_argument("--chunk-rows", type=int, default=None, help="rows per loss chunk (default: loss.chunk_rows_for)")
args = ap.parse_args()
if args.sdpa != "auto":
    for name in ("cudnn", "efficient", "flash", "math"):
        getattr(torch.backends.cuda, f"enable_{name}_sdp" if name != "efficient" else "enable_mem_efficient_sdp")(
            name == args.sdpa)
if args.no_masks:
    import mqa_repro.model as _m

    _m.self_mask = lambda *a, **k: None
    _m.cross_mask = lambda *a, **k: None

v = load_spec("experiments/wmt14_ende.yaml").variants[args.variant]
dev = torch.device("cuda")
seq = min(v.data.max_len, v.model.max_positions)
rows = 32768 // seq
model = build_model(v, dev, "bf16", train=True).train()
step = TrainStep(model, build_optimizer(model, v.training), v.training, dev,
                 options=StepOptions(compile=args.compile, loss_chunk_rows=args.chunk_rows))
src = random_tokens(rows, seq, v.model.vocab_size, "cpu", 1)
tgt = random_tokens(rows, seq + 1, v.model.vocab_size, "cpu", 2)
tgt[:, 0] = BOS
ones = torch.ones(rows, seq, dtype=torch.long)
micro = max(1, (args.micro_tokens or v.training.micro_batch_tokens or rows * seq) // seq)
host = [Batch(tgt[r:r + micro, :-1], tgt[r:r + micro, 1:], ones[r:r + micro], src[r:r + micro], ones[r:r + micro])
        for r in range(0, rows, micro)]


def one(i):
    step([step.prepare(b) for b in host], rows * seq, lr_at(i, v.training)).read()


for i in range(1, 4):
    one(i)
torch.cuda.synchronize()
a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
a.record()
for i in range(args.steps):
    one(10 + i)
b.record()
b.synchronize()
ms = a.elapsed_time(b) / args.steps
print(f"{args.variant}: step {ms:.1f} ms ({rows * seq / ms * 1e3:,.0f} target tokens/s), compile={args.compile}, "
      f"micro-batches {len(host)}, sdpa {args.sdpa}, masks {not args.no_masks}, loss chunk rows "
      f"{args.chunk_rows or 'auto'}", flush=True)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
    for i in range(args.steps):
        one(20 + i)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))
print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
