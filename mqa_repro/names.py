"""Names of result rows shared by ``uptrain`` (which makes them) and ``report`` (which reads them).

An uptrained row is named ``<source>_to_kv<G>_<method>_<amount><unit>``, e.g. ``multi_head_to_kv1_mean_5pct``:
the multi-head source row, the key/value heads G it was converted to, the initialisation method, and the
uptraining length (percent of the source's steps, or a step count).
"""
from __future__ import annotations

import re
from typing import Optional

METHODS = ("mean", "first", "random")
_NAME = re.compile(rf"^(?P<source>.+)_to_kv(?P<kv_heads>\d+)_(?P<method>{'|'.join(METHODS)})_"
                   r"(?P<amount>\d+(?:\.\d+)?)(?P<unit>pct|steps)$")


def uptrain_name(source: str, kv_heads: int, method: str, steps: int, source_steps: int) -> str:
    """Row name, e.g. ``multi_head_to_kv1_mean_5pct`` (percent of the source's steps, or a step count)."""
    pct = 100.0 * steps / source_steps
    tag = f"{pct:g}pct" if abs(pct - round(pct, 1)) < 1e-9 else f"{steps}steps"
    return f"{source}_to_kv{kv_heads}_{method}_{tag}"


def parse_uptrain_name(name: str) -> Optional[dict]:
    """The parts of a name made by :func:`uptrain_name` (source, kv_heads, method, amount, unit), else None."""
    m = _NAME.match(name)
    if not m:
        return None
    return {"source": m["source"], "kv_heads": int(m["kv_heads"]), "method": m["method"],
            "amount": float(m["amount"]), "unit": m["unit"]}
