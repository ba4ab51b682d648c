"""``python -m mqa_repro`` (and ``torchrun -m mqa_repro``) run the CLI."""
from .cli import main

main()
