"""mqa-repro: reproduce "Fast Transformer Decoding: One Write-Head is All You Need" end to end."""

__version__ = "0.1.0"
