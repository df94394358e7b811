"""Megatron checkpoints: where they live and how to recognise a complete one.

A checkpoint directory `checkpoint-N/` is complete exactly when its marker file exists: the marker is the
last thing written, after every rank has finished, and the directory is published by an atomic rename.
"""

from __future__ import annotations

import os

MARKER_FILE = "mca_checkpoint.json"


def is_megatron_checkpoint(path: str) -> bool:
    """True for a complete checkpoint written by llamafactory-mca (see MARKER_FILE)."""
    return os.path.isfile(os.path.join(path, MARKER_FILE))
