"""Bytes: the .dsq container, tensor encodings, and (later) entropy and sparse-index coders."""

from deepsqueeze.codec.format import (
    FORMAT_VERSION,
    MAGIC,
    ArtifactContents,
    TensorEntry,
    read_artifact,
    write_artifact,
)

__all__ = ["FORMAT_VERSION", "MAGIC", "ArtifactContents", "TensorEntry", "read_artifact", "write_artifact"]
