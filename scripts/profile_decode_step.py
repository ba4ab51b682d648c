"""Where a decoder step's time goes on a GPU: per-kernel times of one fast step (torch.profiler) and the
decode-attention kernel alone under several launch configurations. A development tool (notes/bench.md)."""
import sys

import torch

from mqa_repro import fastdecode
from mqa_repro.bench import build_model, random_tokens
from mqa_repro.fastdecode import FastDecoder, decode_attention
from mqa_repro.spec import load_spec

spec = load_spec("experiments/wmt14_ende.yaml")
dev = torch.device("cuda")
B, S, T = 1024, 128, 128


def bench_ms(fn, reps=20):
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


# 1. attention kernel alone: achieved GB/s per launch configuration
for name, g, share in (("mqa-cross", 1, 1), ("mha-cross", 8, 1), ("mqa-cross-beam4", 1, 4)):
    n = B * share
    q = torch.randn(n, 8, 128, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(B, S, g, 256, device=dev, dtype=torch.bfloat16)
    ref = decode_attention(q, kv, S, 128, share, 128 ** -0.5, None, False, use_triton=False)
    nbytes = kv.numel() * 2
    for bt in (32, 64, 128):
        for w in (4, 8):
            for st in (1, 2, 3):
                fastdecode.ATTENTION_CONFIG.update(block_t=bt, num_warps=w, num_stages=st)
                try:
                    out = decode_attention(q, kv, S, 128, share, 128 ** -0.5, None, False)
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    ms = bench_ms(lambda: decode_attention(q, kv, S, 128, share, 128 ** -0.5, None, False))
                    print(f"{name} block_t={bt} warps={w} stages={st}: {ms*1e3:.1f} us "
                          f"{nbytes/ms/1e6:.0f} GB/s err {err:.1e}", flush=True)
                except Exception as e:
                    print(f"{name} {bt} {w} {st}: {type(e).__name__}", flush=True)
fastdecode.ATTENTION_CONFIG.update(block_t=64, num_warps=4, num_stages=2)
if len(sys.argv) > 1:
    fastdecode.ATTENTION_CONFIG.update(block_t=int(sys.argv[1]), num_warps=int(sys.argv[2]),
                                       num_stages=int(sys.argv[3]))

# 2. per-kernel time of one greedy step at t = 64
for vname in ("multi_query", "multi_head"):
    v = spec.variants[vname]
    model = build_model(v, dev, "bf16")
    fast = FastDecoder(model)
    cross = fast.encode(random_tokens(B, S, v.model.vocab_size, dev))
    ch = fast.new_chunk(cross, B, 1, T)
    for _ in range(3):
        fast.greedy_step(ch, 64)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fast.greedy_step(ch, 64)
        torch.cuda.synchronize()
    print(vname, "step ms (eager)", bench_ms(lambda: fast.greedy_step(ch, 64), 10))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    del model, fast, cross, ch
    torch.cuda.empty_cache()
