"""``python -m deepsqueeze ...``: the CLI (also what ``torchrun -m deepsqueeze compress ...`` starts)."""

from deepsqueeze.cli.app import main

main()
