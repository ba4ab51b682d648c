"""The papers' own numbers, printed beside ours in the report (Shazeer 2019, Tables 1-3).

These are the published values, not results of this tool; ``report`` labels them "paper".
Keys are the variant names every spec uses.
"""

# Table 1: WMT14 EN-DE. ln(PPL) dev, BLEU dev (greedy), BLEU test beam 1 / beam 4 (None: not reported).
TABLE1 = {
    "multi_head":        dict(h=8, d_k=128, d_ff=4096, ln_ppl_dev=1.424, bleu_dev=26.7, bleu_test_b1=27.7, bleu_test_b4=28.4),
    "multi_query":       dict(h=8, d_k=128, d_ff=5440, ln_ppl_dev=1.439, bleu_dev=26.5, bleu_test_b1=27.5, bleu_test_b4=28.5),
    "multi_head_local":  dict(h=8, d_k=128, d_ff=4096, ln_ppl_dev=1.427, bleu_dev=26.6, bleu_test_b1=27.5, bleu_test_b4=28.3),
    "multi_query_local": dict(h=8, d_k=128, d_ff=5440, ln_ppl_dev=1.437, bleu_dev=26.5, bleu_test_b1=27.6, bleu_test_b4=28.2),
    "h1_dk128":          dict(h=1, d_k=128, d_ff=6784, ln_ppl_dev=1.518, bleu_dev=25.8, bleu_test_b1=None, bleu_test_b4=None),
    "h2_dk64":           dict(h=2, d_k=64, d_ff=6784, ln_ppl_dev=1.480, bleu_dev=26.2, bleu_test_b1=26.8, bleu_test_b4=27.9),
    "h4_dk32":           dict(h=4, d_k=32, d_ff=6784, ln_ppl_dev=1.488, bleu_dev=26.1, bleu_test_b1=None, bleu_test_b4=None),
    "h8_dk16":           dict(h=8, d_k=16, d_ff=6784, ln_ppl_dev=1.513, bleu_dev=25.8, bleu_test_b1=None, bleu_test_b4=None),
}

# Table 2: TPUv2, microseconds per output token, sequence length 128, batch 1024.
TABLE2 = {
    "multi_head":        dict(training=13.2, enc_greedy=1.7, dec_greedy=46.0, enc_beam4=2.0, dec_beam4=203.0),
    "multi_query":       dict(training=13.0, enc_greedy=1.5, dec_greedy=3.8, enc_beam4=1.6, dec_beam4=32.0),
    "multi_head_local":  dict(training=13.2, enc_greedy=1.7, dec_greedy=23.0, enc_beam4=1.9, dec_beam4=47.0),
    "multi_query_local": dict(training=13.0, enc_greedy=1.5, dec_greedy=3.3, enc_beam4=1.6, dec_beam4=16.0),
}
TABLE2_DEVICE = "TPUv2 (8 cores)"

# Table 3: One Billion Word LM, dev perplexity.
TABLE3 = {
    "multi_head":  dict(h=8, d_k=128, d_ff=8192, ppl_dev=29.9),
    "multi_query": dict(h=8, d_k=128, d_ff=9088, ppl_dev=30.2),
    "h1_dk128":    dict(h=1, d_k=128, d_ff=9984, ppl_dev=31.2),
    "h2_dk64":     dict(h=2, d_k=64, d_ff=9984, ppl_dev=31.1),
    "h4_dk32":     dict(h=4, d_k=32, d_ff=9984, ppl_dev=31.0),
    "h8_dk16":     dict(h=8, d_k=16, d_ff=9984, ppl_dev=30.9),
}

ROW_LABELS = {
    "multi_head": "multi-head", "multi_query": "multi-query", "multi_head_local": "multi-head local",
    "multi_query_local": "multi-query local", "h1_dk128": "multi-head h=1",
    "h2_dk64": "multi-head h=2", "h4_dk32": "multi-head h=4", "h8_dk16": "multi-head h=8, small d_k",
    "gqa2": "grouped-query, 2 K/V heads", "gqa4": "grouped-query, 4 K/V heads",
}
