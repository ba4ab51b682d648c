"""The fixed-length protocol of the paper's Table 2 (decode-bench): every row decodes exactly ``steps``
tokens, EOS ignored, full-length sources; on a GPU one CUDA graph per step position, the live length static
in each. Built by :meth:`Engine.fixed_run <mqa_repro.decode.engine.Engine.fixed_run>` on the engine's
decoder step, cache and search.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from ..model import BOS, PAD
from .cache import DecodeCache
from .warmup import wait_warm_up
from .search import Beam, Greedy

if TYPE_CHECKING:
    from .engine import Engine


class FixedRun:
    """``steps`` fixed-length decoding steps of ``batch`` sentences x ``beam`` (the paper's protocol):
    EOS ignored, one CUDA graph per step on a GPU (live length static in each), eager elsewhere."""

    def __init__(self, engine: Engine, batch: int, beam: int, steps: int, src_BS: Optional[torch.Tensor]):
        self.engine, self.steps, self.beam = engine, steps, beam
        m, dev = engine.spec, engine.device
        wait_warm_up()
        self.cache = DecodeCache(len(engine.model.decoder), batch, beam, m.n_kv_heads, m.d_k, m.d_v, steps,
                                 m.window, dev, engine.model.embed.weight.dtype)
        if src_BS is not None:
            if bool((src_BS == PAD).any()):
                raise ValueError("the fixed-length protocol expects full-length sources (no padding)")
            self.cache.set_cross(engine.step.encode(src_BS), None)
        vl = engine.vocab_limit
        self.search = (Greedy(batch, steps, dev, eos=False, vocab_limit=vl,
                              tune=engine.step.fused and engine.step.tune) if beam == 1 else
                       Beam(batch, beam, steps, dev, eos=False, vocab_limit=vl,
                            use_triton=engine.step.use_triton))
        self._bos = torch.full((batch * beam,), BOS, dtype=torch.long, device=dev)
        self.graphs = []
        self.reset()
        if engine.graphs:
            self._capture()

    def _step(self, t: int) -> None:
        s, c = self.search, self.cache
        if c.anc is not None:
            if t:
                c.follow(s.parent_TN[t - 1], t)
            c.mark_own(t, t)
        s.step(self.engine.step.logits(c, s.tok_N, t), t)

    @torch.no_grad()
    def _capture(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # warm-up: kernels compiled and tuned, cuBLAS handles and workspaces made
            for t in range(self.steps):
                self._step(t)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        for t in range(self.steps):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self._step(t)
            self.graphs.append(g)
        torch.cuda.synchronize()
        self.reset()

    def reset(self) -> None:
        """Back to step 0 (the caches need no clearing: a step writes a position before it is read)."""
        self.search.reset(self._bos)

    @torch.no_grad()
    def run(self) -> None:
        """All steps from the start (call reset() first); asynchronous on CUDA."""
        if self.graphs:
            for g in self.graphs:
                g.replay()
        else:
            for t in range(self.steps):
                self._step(t)

    def tokens(self) -> torch.Tensor:
        """Greedy: the emitted tokens [N, steps]; beam: each sentence's best hypothesis [B, steps]."""
        if self.beam == 1:
            return self.search.out_TN.t().contiguous()
        return torch.tensor(self.search.results(), dtype=torch.long)
