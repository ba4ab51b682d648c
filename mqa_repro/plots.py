"""The report's plots: decoder time against batch and length beside the roofline (from decode-bench
sweeps), and quality against K/V-cache size (from Tables 1 and 3)."""
from __future__ import annotations

from pathlib import Path

from .names import parse_uptrain_name
from .tables import row_label, row_order


def plots(benches: list, tables: list, out_dir) -> list:
    """Write the plots of the decode-bench results ``benches`` ((path, JSON) pairs) and of ``tables`` into
    ``out_dir`` (PNG); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, bench in benches:
        dev = bench.get("provenance", {}).get("device", {}).get("name", "?")
        for sweep, xkey, xlabel in (("batch", "batch", "batch size (sentences)"),
                                    ("length", "tgt_len", "sequence length (source = target)")):
            rows = [r for r in bench.get("rows", []) if r.get("sweep") == sweep and r["measure"] == "decoder"]
            if not rows:
                continue
            fig, ax = plt.subplots(figsize=(6.4, 4.4))
            for i, name in enumerate(row_order({r["variant"] for r in rows})):
                rs = sorted((r for r in rows if r["variant"] == name), key=lambda r: r[xkey])
                xs = [r[xkey] for r in rs]
                line, = ax.plot(xs, [r["us_per_token"] for r in rs], "o-", label=row_label(name))
                ax.plot(xs, [r["bound_us_per_token"] for r in rs], "--", color=line.get_color(), alpha=0.6)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("decoder µs per output token")
            ax.set_title(f"Incremental decoding on {dev} (dashed: roofline)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            f = out_dir / f"decoder_vs_{sweep}_{path.parent.name}.png"
            fig.tight_layout()
            fig.savefig(f, dpi=120)
            plt.close(fig)
            written.append(f)
    for t in tables:
        if t.key.startswith("table1_"):
            ykeys = [k for k, _ in t.columns if k.startswith("bleu_") and k != "bleu_dev"]
            if ykeys:   # the first test set at the largest beam
                first = ykeys[0].rsplit("_b", 1)[0]
                ykey = max((k for k in ykeys if k.rsplit("_b", 1)[0] == first),
                           key=lambda k: int(k.rsplit("_b", 1)[1]))
                ylabel = ykey.replace("bleu_", "test BLEU ").replace("_b", ", beam ")
            else:
                ykey, ylabel = "bleu_dev", "dev BLEU"
        elif t.key.startswith("table3_"):
            ykey, ylabel = "ppl_dev", "dev perplexity (subword)"
        else:
            continue
        pts = [(r["kv_bytes_per_token"], r[ykey][0], r["variant"]) for r in t.rows   # the paper's rows (and GQA)
               if isinstance(r.get(ykey), tuple) and r[ykey][0] is not None and not parse_uptrain_name(r["variant"])]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for x, y, name in pts:
            ax.scatter([x], [y])
            ax.annotate(row_label(name), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("self-attention K/V cache bytes per decoded token per sequence (bf16)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"Quality against K/V-cache size ({t.key.split('_', 1)[1]})")
        ax.grid(True, alpha=0.3)
        f = out_dir / f"quality_vs_kv_{t.key.split('_', 1)[1]}.png"
        fig.tight_layout()
        fig.savefig(f, dpi=120)
        plt.close(fig)
        written.append(f)
    return written

