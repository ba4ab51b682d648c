"""Perplexity: the summed negative log-likelihood of a model over a corpus (dev evaluation during
training, ``mqa-repro evaluate``).

Per target token (EOS included) the NLL is ``logsumexp(z) - z_y`` in nats over the real vocabulary
(``loss.token_losses``, no label smoothing, no z-loss); ln(perplexity) is the sum divided by the count.
Examples are scored one per row, unpacked and sorted by length, in batches of at most ``batch_tokens``
target positions.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .batching import Examples, collate
from .loss import token_losses
from .model import PAD, Transformer
from .runtime import autocast


@torch.no_grad()
def corpus_nll(model: Transformer, ex: Examples, device, batch_tokens: int = 8192, progress=None,
               eos_scored: Optional[np.ndarray] = None) -> tuple:
    """(summed NLL in nats, target tokens incl. EOS, per-example NLL) over ``ex``, unpacked, by length.

    ``eos_scored`` (bool [len(ex)], default all true): where false, the example's EOS is neither scored nor
    counted (a piece of a long line that the next piece continues: its line has not ended there)."""
    was_training = model.training
    model.eval()
    vocab = model.spec.vocab_size
    order = np.argsort(ex.tgt_lens, kind="stable")
    per_example = np.zeros(len(ex), dtype=np.float64)
    total, count = 0.0, 0
    i = 0
    lens = ex.tgt_lens
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * lens[order[j]] <= batch_tokens:
            j += 1
        idx = order[i:j]
        b = collate(ex, [[int(k)] for k in idx]).to(device)
        with autocast(device):
            logits = model(b.tgt_in_BT, b.src_BS, b.tgt_seg_BT, b.src_seg_BS)
        _, nll_BT, _ = token_losses(logits, b.tgt_out_BT, vocab)
        scored_BT = b.tgt_out_BT != PAD
        if eos_scored is not None:
            for r, k in enumerate(idx):
                if not eos_scored[k]:
                    scored_BT[r, len(ex.tgt[k])] = False
        nll_BT = nll_BT.masked_fill(~scored_BT, 0.0).double()
        per_row = nll_BT.sum(1).cpu().numpy()
        per_example[idx] = per_row
        total += float(per_row.sum())
        count += int(scored_BT.sum())
        if progress is not None:
            progress(len(idx))
        i = j
    model.train(was_training)
    return total, count, per_example
