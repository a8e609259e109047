"""Runtime representations: how a compressed layer is stored, executed and exported."""
