"""Benchmarks: one module per benchmark (``NAME``, ``TITLE``, ``run(ctx) -> list[dict]``), run by ``deepsqueeze bench``."""
