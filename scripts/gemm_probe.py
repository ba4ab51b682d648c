"""Are the decoder's matrix products at 1024 rows leaving time on the table? (a development probe, notes/bench.md)

Times cuBLAS (torch.mm) against a plain Triton matmul over a few tile shapes, for the products of one greedy
decode step at batch 1024 with the paper's dimensions: x [1024, K] @ w[N, K]^T. Each as 20 calls in one CUDA
graph, median of 7 replays, inputs resident in L2 where they fit (the same for both).

    PYTHONPATH=. python3 scripts/gemm_probe.py
"""
import torch
import triton
import triton.language as tl

from read_bandwidth import graph_seconds   # scripts/ is on the path when this file runs


@triton.jit
def _mm_kernel(a_ptr, w_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_cm,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """c = a @ w^T; a [M, K], w [N, K], both unit stride along K; programs grouped GROUP_M tiles down."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    in_group = GROUP_M * grid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pm = first_m + (pid % in_group) % size_m
    pn = (pid % in_group) // size_m
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a = a_ptr + rm[:, None] * stride_am + rk[None, :]
    w = w_ptr + rn[None, :] * stride_wn + rk[:, None]
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        acc += tl.dot(tl.load(a, mask=rm[:, None] < M, other=0.0), tl.load(w, mask=rn[None, :] < N, other=0.0))
        a += BK
        w += BK
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def triton_mm(a, w, c, cfg):
    bm, bn, bk, warps, stages = cfg
    m, k = a.shape
    n = w.shape[0]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _mm_kernel[grid](a, w, c, m, n, k, a.stride(0), w.stride(0), c.stride(0), BM=bm, BN=bn, BK=bk, GROUP_M=8,
                     num_warps=warps, num_stages=stages)


CONFIGS = [(128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
           (64, 64, 64, 4, 4), (128, 256, 64, 8, 3), (64, 64, 128, 4, 3), (128, 64, 128, 4, 3),
           (64, 128, 128, 4, 3)]
SHAPES = [("o / cross q / cross o", 1024, 1024), ("ffn wi", 4096, 1024), ("ffn wo", 1024, 4096),
          ("qkv multi-head", 3072, 1024), ("qkv multi-query", 1280, 1024), ("vocabulary", 33792, 1024)]


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    m = 1024
    for name, n, k in SHAPES:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        want = torch.mm(a, w.t())
        flops = 2 * m * n * k
        s = graph_seconds(lambda: torch.mm(a, w.t(), out=c))
        line = f"{name:24s} {m}x{n}x{k}: cuBLAS {s * 1e6:6.1f} us ({flops / s / 1e12:4.0f} TFLOP/s)"
        best = None
        for cfg in CONFIGS:
            try:
                triton_mm(a, w, c, cfg)
                torch.testing.assert_close(c.float(), want.float(), atol=0.05, rtol=0.02)
                t = graph_seconds(lambda: triton_mm(a, w, c, cfg))
            except Exception as e:   # a launch needing more shared memory than there is
                print(f"    {cfg}: {type(e).__name__}")
                continue
            print(f"    {cfg}: {t * 1e6:6.1f} us")
            if best is None or t < best[1]:
                best = (cfg, t)
        print(line + f"; Triton best {best[0]} {best[1] * 1e6:6.1f} us ({flops / best[1] / 1e12:4.0f} TFLOP/s)",
              flush=True)


if __name__ == "__main__":
    main()
