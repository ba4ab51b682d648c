"""The ``mqa-repro`` command line: each command parses, loads the spec and calls one library function."""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import UserError

app = typer.Typer(
    name="mqa-repro",
    help="Reproduce 'Fast Transformer Decoding: One Write-Head is All You Need' (multi-query attention) "
         "end to end: prepare real corpora, train every attention variant, evaluate BLEU and perplexity, "
         "time incremental decoding beside the device's roofline, and report the paper's tables.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# When piped, do not squeeze tables into 80 columns.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)


class TableFormat(str, Enum):
    table = "table"
    json = "json"


@app.callback()
def _root() -> None:
    """Commands take an experiment spec (YAML, see experiments/) and write under results/."""


# --------------------------------------------------------------------------------------------------
@app.command()
def describe(
    spec: Path = typer.Argument(..., help="Experiment spec (YAML), e.g. experiments/wmt14_ende.yaml."),
    format: TableFormat = typer.Option(TableFormat.table, "--format", "-f", help="table, or json for machines."),
):
    """Validate a spec and list its variants: heads, K/V heads, d_k, d_v, d_ff, window, parameters and
    key/value cache bytes per decoded token per sequence (bf16; self-attention and encoder-decoder apart)."""
    from .spec import describe_rows, load_spec

    s = load_spec(spec)
    rows = describe_rows(s)
    if format == TableFormat.json:
        print(json.dumps(rows, indent=2))
        return
    t = Table(title=f"{s.name}: {s.description}" if s.description else s.name,
              caption="h: query heads, kv: key/value heads; KV cache bytes per sequence in bf16")
    cols = [("variant", "variant"), ("h", "n_heads"), ("kv", "n_kv_heads"), ("d_k", "d_k"),
            ("d_v", "d_v"), ("d_ff", "d_ff"), ("window", "window"), ("params", "params"),
            ("KV self B/tok", "kv_self_bytes_per_token"), ("KV cross B/src", "kv_cross_bytes_per_source_token")]
    for title, _ in cols:
        t.add_column(title, justify="left" if title == "variant" else "right")
    for r in rows:
        cells = []
        for title, key in cols:
            v = r[key]
            if key == "params":
                cells.append(f"{v / 1e6:.2f}M")
            elif v is None:
                cells.append("-")
            else:
                cells.append(str(v))
        t.add_row(*cells)
    out.print(t)


# --------------------------------------------------------------------------------------------------
def main() -> None:
    try:
        app()
    except UserError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
