"""How fast this GPU reads, against how fast decode attention reads (a development probe, notes/bench.md).

The roofline's bandwidth is a device-to-device copy (read + write). Decode attention only reads, and a pure
read may run faster than a copy: if it does, attention has headroom the copy ceiling hides. Prints GB/s of
(1) the roofline's copy (measured as decode-bench measures it, eagerly), (2) torch.sum and torch.amax over
2 GiB, (3) the decode-attention kernel at the benchmark's encoder-decoder shapes (1024 rows, 8 query heads,
8 or 1 K/V heads, 128 positions, d_k = d_v = 128, bf16); (2) and (3) as 20 calls in one CUDA graph, median
of 7 replays. (A copy inside a graph is a memcpy node, which ran at 2.8 TB/s on an H200: not comparable.)

    PYTHONPATH=. python3 scripts/read_bandwidth.py
"""
import statistics

import torch

from mqa_repro.decode import kernels as fd
from mqa_repro.roofline import measure_ceilings


def graph_seconds(fn, calls: int = 20, replays: int = 7) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(dev), torch.__version__)
    n = 2 * 2**30 // 2                          # 2 GiB of bf16
    src = torch.randn(n, device=dev, dtype=torch.bfloat16)
    nbytes = src.numel() * 2
    print(f"copy   {measure_ceilings(dev).bandwidth_Bps / 1e9:7.0f} GB/s (read + write, the roofline's figure)")
    s = graph_seconds(lambda: src.sum(dtype=torch.float32))
    print(f"sum    {nbytes / s / 1e9:7.0f} GB/s (read)")
    s = graph_seconds(lambda: src.amax())
    print(f"amax   {nbytes / s / 1e9:7.0f} GB/s (read)")

    m, h, d, length = 1024, 8, 128, 128
    for g, name in ((8, "multi-head"), (1, "multi-query")):
        q = torch.randn(m, h, d, device=dev, dtype=torch.bfloat16)
        kv = torch.randn(m, length, g, 2 * d, device=dev, dtype=torch.bfloat16)   # row-major [M, S, G, C]
        kv_bytes = kv.numel() * 2
        for cfg in ((64, 4, 2), (128, 4, 2), (32, 4, 3)):
            s = graph_seconds(lambda: fd.decode_attention(q, kv, length, d, 1, d ** -0.5, None, time_major=False,
                                                          config=cfg))
            print(f"attention {name} {cfg}: {kv_bytes / 1e6:.0f} MB in {s * 1e6:.1f} us = "
                  f"{kv_bytes / s / 1e9:.0f} GB/s")


if __name__ == "__main__":
    main()
