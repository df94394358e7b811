"""Our loggers, and the third-party noise kept out of a run's output.

Our loggers are children of LLaMA-Factory's library logger, so they share its handlers, format and level.
(A logger named `llamafactory_mca.*` has no handler: its INFO lines, such as the global-batch rule, were lost.)

Noise: messages of megatron-core, Transformer Engine / Apex probes, torch and gloo that say nothing about the run
(`doctor` reports TE, Apex and the device once). Python warnings and log records are filtered in every process of
ours (`quiet_third_party`, called at activation); gloo's connection lines are printed by C++ on the training
processes' stdout, so the launching process filters the torchrun child's stdout line by line
(`run_with_quiet_stdout`). `LLAMAFACTORY_MCA_VERBOSE=1` shows everything again.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Mapping
from typing import Any, Optional

VERBOSE = "LLAMAFACTORY_MCA_VERBOSE"

# Python warnings (message starts), each seen once per import of the module that warns
NOISE_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",  # megatron's own default cuda_graph_scope, not ours to change
    r"TypedStorage is deprecated",  # torch.distributed.checkpoint's internals
)
# logger name -> message start of log records without news for the user
NOISE_RECORDS = {
    "torch.utils.cpp_extension": r"No CUDA runtime is found",
}
# whole lines printed by C++ code (gloo) on stdout
NOISE_LINES = (
    re.compile(r"^(\[rank\d+\]:)?\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. Expected number of connected peer "
               r"ranks is : \d+\s*$"),
)


def get_logger(name: str) -> Any:
    """LLaMA-Factory's logger (with `info_rank0` / `warning_rank0`) named `llamafactory.mca.<name>`."""
    from llamafactory.extras import logging as lf_logging

    return lf_logging.get_logger(f"llamafactory.mca.{name}")


def is_verbose() -> bool:
    """`LLAMAFACTORY_MCA_VERBOSE=1`: third-party noise is shown."""
    return os.environ.get(VERBOSE, "").lower() in ("1", "true", "y", "yes", "on")


class _DropRecords(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self._pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._pattern.match(record.getMessage())


def quiet_third_party() -> None:
    """Hide the known third-party warnings and log records in this process (unless verbose). Cheap: stdlib only."""
    if is_verbose():
        return
    for message in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name, pattern in NOISE_RECORDS.items():
        logging.getLogger(name).addFilter(_DropRecords(pattern))


def is_noise_line(line: str) -> bool:
    """Whether one output line of a training process is third-party noise."""
    return any(p.match(line) for p in NOISE_LINES)


def run_with_quiet_stdout(cmd: list[str], env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, env=env)` for the torchrun command, with its stdout passed on line by line without
    noise lines (stderr, where progress bars go, untouched). Unbuffered children, so lines arrive as printed."""
    env = dict(os.environ if env is None else env)
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE)
    out = sys.stdout.buffer
    try:
        for raw in proc.stdout:
            if not is_noise_line(raw.decode("utf-8", errors="replace")):
                out.write(raw)
                out.flush()
    finally:
        returncode = proc.wait()
    return subprocess.CompletedProcess(cmd, returncode)
