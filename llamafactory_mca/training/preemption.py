"""Preemption: on SIGTERM / SIGUSR1 (the recipe key `save_on_signal`) finish the current optimizer step, save a
checkpoint with every rank, and exit 0, so that a restarted job resumes by itself from `output_dir`.

A signal handler only sets a flag (nothing unsafe happens inside it). Once per optimizer step every rank calls
`PreemptionWatch.stop_requested()`, one all-reduce (MAX) of that flag over all ranks: the ranks agree on the same
step even when only one of them got the signal (a scheduler that signals a single process, `kill` of one worker),
so they all enter the collective checkpoint save together. Megatron-LM's `--exit-signal-handler` works the same
way (an all-gather of each rank's flag per iteration).
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

if TYPE_CHECKING:  # this module imports without torch: args.py validates `save_on_signal` with it
    import torch


def _logger() -> Any:
    from llamafactory_mca.log import get_logger  # LLaMA-Factory's handlers (imported only once training runs)

    return get_logger("preemption")

# Signals that may trigger a save. SIGKILL / SIGSTOP cannot be caught; SIGINT stays Ctrl-C's (stop now).
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP")
DISABLED = ("", "none", "false", "no", "off")


def signal_names(value: Union[str, Iterable[str], None]) -> list[str]:
    """The signal names of a `save_on_signal` value: a list (YAML) or a comma-separated string, e.g.
    "SIGTERM,SIGUSR1"; names may omit the `SIG` prefix ("term", "usr1"); "none" (or empty) disables. Raises
    ValueError naming the allowed signals for anything else."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    names = []
    for item in items:
        name = str(item).strip().upper()
        if name.lower() in DISABLED:
            continue
        if not name.startswith("SIG"):
            name = "SIG" + name
        if name not in SIGNALS or not hasattr(signal, name):
            raise ValueError(f"'{item}' is not a signal that can trigger a save (allowed: {', '.join(SIGNALS)})")
        if name not in names:
            names.append(name)
    return names


class PreemptionWatch:
    """Handlers for `signals` (names, see `signal_names`), installed on creation in the main thread.

    `stop_requested()` is collective: every rank must call it at the same point of every optimizer step.
    `close()` puts the previous handlers back.
    """

    def __init__(self, signals: Union[str, Iterable[str], None], device: Optional["torch.device"] = None) -> None:
        self.names = signal_names(signals)
        self.device = device or "cpu"
        self.received: Optional[str] = None  # the first signal this process got
        self.triggered = False  # some rank got one: the run saves and stops
        self._previous: dict[int, Any] = {}
        for name in self.names:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            _logger().warning("received %s: the run saves a checkpoint after this optimizer step and stops",
                              self.received)

    def stop_requested(self) -> bool:
        """True on every rank once any rank got a signal (collective: one all-reduce of one element)."""
        if not self.names:
            return False
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32, device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.triggered = self.triggered or bool(flag.item())
        return self.triggered

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def exit_after_save(watch: PreemptionWatch, checkpoint_dir: str) -> None:
    """After the checkpoint of a signalled run is published: tear down torch.distributed and exit 0 (a job
    that restarts then resumes from `output_dir`)."""
    import torch.distributed as dist

    from llamafactory_mca import platform

    if not dist.is_initialized() or dist.get_rank() == 0:
        _logger().warning("preempted (%s): saved %s; exiting with status 0. Restart the same recipe (without "
                          "overwrite_output_dir) to resume from it.", watch.received or "signal on another rank",
                          checkpoint_dir)
    watch.close()
    if dist.is_initialized():
        dist.barrier()
    platform.destroy_parallel()
    raise SystemExit(0)
