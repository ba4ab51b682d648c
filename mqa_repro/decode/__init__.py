"""Inference: one decoding engine for evaluation, translation, generation and the benchmark.

* :mod:`.cache`   the K/V cache (self-attention slab or ring buffer, encoder-decoder K/V once per sentence,
                  beams by ancestor table)
* :mod:`.search`  greedy and beam search (the paper's length penalty; beam 1 equals greedy)
* :mod:`.kernels` the Triton kernels and their torch fallbacks
* :mod:`.tuning`  tuned kernel launches and product variants (timed on the device)
* :mod:`.step`    one decoder step (and the encoder) from the model's weights laid out for speed
* :mod:`.engine`  :class:`Engine`: batching, early stop, compaction, CUDA graphs, prefill
* :mod:`.fixed`   :class:`FixedRun`: the fixed-length protocol of Table 2 (``Engine.fixed_run``)

The eager ``Transformer.decode_step`` is the engine's test oracle (tests/oracle.py).
"""
from .engine import Engine
from .fixed import FixedRun
from .kernels import forbid_specials
from .search import length_penalty, max_lengths
from .tuning import tuning_record

__all__ = ["Engine", "FixedRun", "forbid_specials", "length_penalty", "max_lengths", "tuning_record"]
