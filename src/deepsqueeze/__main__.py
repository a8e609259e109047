"""``python -m deepsqueeze ...``: the CLI (also what ``torchrun -m deepsqueeze compress ...`` starts)."""

from deepsqueeze_cli import main

main()
