"""Our loggers are children of LLaMA-Factory's library logger, so they share its handlers, format and level.

(A logger named `llamafactory_mca.*` has no handler: its INFO lines, such as the global-batch rule, were lost.)
"""

from __future__ import annotations

from typing import Any


def get_logger(name: str) -> Any:
    """LLaMA-Factory's logger (with `info_rank0` / `warning_rank0`) named `llamafactory.mca.<name>`."""
    from llamafactory.extras import logging as lf_logging

    return lf_logging.get_logger(f"llamafactory.mca.{name}")
