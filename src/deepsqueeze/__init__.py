"""deepsqueeze: make trained PyTorch models smaller and faster, and prove it."""

__version__ = "0.1.0"
