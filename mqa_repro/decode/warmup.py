"""Work a process does once at its first decoding step, started early on a background thread so that the
caller's other work (loading a checkpoint, scoring perplexities) hides it: Triton's start-up and cuBLAS's
first products. See :func:`start_warm_up`."""
from __future__ import annotations

import importlib
import threading
import time
from typing import Optional

import torch

from . import kernels
from .kernels import triton

_warm_up: Optional[threading.Thread] = None


def start_warm_up(products_on: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
    """Start, on a background thread, work a process does once at its first decoding step, so that a caller
    that does other work before decoding (``evaluate`` loads the checkpoint and scores the perplexities
    first) hides it; :func:`wait_warm_up` joins the thread before the engine's first launch, so nothing is
    done twice and nothing runs beside a CUDA graph capture.

    * Triton (when installed): hashing its own compiler (libtriton and its Python sources: the key of its
      on-disk kernel cache), importing its compiler's front end (together about 0.55 s on an H200 host,
      notes/engine.md), creating its CUDA driver object (its utilities module loaded, the platform probed),
      asking ptxas its version and hashing each of :mod:`.kernels`' kernels' sources (tens of ms a process:
      cProfile of a fresh `evaluate`, notes/engine.md).
    * With ``products_on`` (a CUDA device) and ``dtype``: cuBLAS's first matrix products of that dtype in
      the process (a product, an in-place addmm and one with a ReLU epilogue, 64 x 64, on a side stream).
      The first float32 product of an `evaluate` process took 56-61 ms on an H200 host whatever its shape
      (the encoder's first projection; later ones about 0.1 ms; notes/engine.md). Only callers that capture
      no CUDA graph before joining pass it: a capture fails while another thread loads kernels.

    Best effort: ``triton.runtime.cache.triton_key``, ``triton.runtime.driver`` and the rest are Triton's
    internals (cached per process); when they are missing or anything fails, the work is done at the first
    launch as it always has been."""
    global _warm_up
    cublas = products_on is not None and dtype is not None and products_on.type == "cuda"
    if _warm_up is not None or (triton is None and not cublas):
        return

    def work():
        if cublas:
            try:
                with torch.cuda.device(products_on), torch.cuda.stream(torch.cuda.Stream(products_on)):
                    a = torch.ones(64, 64, device=products_on, dtype=dtype)
                    torch.mm(a, a).addmm_(a, a)
                    torch._addmm_activation(a[0], a, a)
                    torch.cuda.current_stream().synchronize()
            except Exception:  # noqa: BLE001 - an optimisation only
                pass
        if triton is None:
            return
        try:
            from triton.runtime import driver
            from triton.runtime.cache import triton_key

            triton_key()
            importlib.import_module("triton.experimental.gluon")   # its compiler's first kernel imports it
            target = driver.active.get_current_target()   # the driver: its utilities loaded, the platform probed
            from triton.compiler.compiler import make_backend
            from triton.runtime.jit import JITFunction

            make_backend(target).hash()           # the compiler's version (ptxas --version): part of every key
            for fn in list(vars(kernels).values()):   # each kernel's source hash (its dependencies parsed)
                if isinstance(fn, JITFunction):
                    fn.cache_key
        except Exception:  # noqa: BLE001 - an optimisation only
            pass

    _warm_up = threading.Thread(target=work, name="decode-warm-up")
    _warm_up.start()


WAITED = [0.0]   # seconds the engine waited for that thread (scripts/evaluate_whole_speed.py records them)


def wait_warm_up() -> None:
    """Join the thread of :func:`start_warm_up` (at once when none was started or it is done)."""
    if _warm_up is not None and _warm_up.is_alive():
        t0 = time.perf_counter()
        _warm_up.join()
        WAITED[0] += time.perf_counter() - t0
