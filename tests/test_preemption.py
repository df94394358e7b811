"""save_on_signal without processes: the key's validation and the signal watch in this one process (the
multi-rank behaviour: test_checkpoint_resume.test_faults_never_lose_the_run, test_checkpoint_e2e)."""

from __future__ import annotations

import os
import signal

import pytest

from llamafactory_mca.args import McaArgumentError, MegatronArguments, validate_megatron_args
from llamafactory_mca.training.preemption import PreemptionWatch, signal_names


@pytest.mark.parametrize("value", ["SIGKILL", "SIGTERM,sigstop", ["SIGTERM", "SIGINT"], "SIGTERN"])
def test_bad_signals_name_the_key_and_the_fix(value):
    with pytest.raises(McaArgumentError) as err:
        validate_megatron_args(MegatronArguments(save_on_signal=value), 1)
    assert "`save_on_signal`" in str(err.value) and "Fix:" in str(err.value)


def test_signal_values():
    assert signal_names(MegatronArguments().save_on_signal) == ["SIGTERM", "SIGUSR1"]
    assert signal_names(["term", "SIGUSR2", "SIGTERM"]) == ["SIGTERM", "SIGUSR2"]
    assert signal_names("none") == signal_names("") == signal_names(None) == []
    validate_megatron_args(MegatronArguments(save_on_signal="none"), 1)


def test_watch_flags_a_signal_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    watch = PreemptionWatch("SIGUSR1")
    try:
        assert not watch.stop_requested()
        os.kill(os.getpid(), signal.SIGUSR1)  # the process goes on: the step finishes, then the run saves
        assert watch.received == "SIGUSR1" and watch.stop_requested() and watch.triggered
    finally:
        watch.close()
    assert signal.getsignal(signal.SIGUSR1) == before
    off = PreemptionWatch("none")
    assert not off.stop_requested() and signal.getsignal(signal.SIGUSR1) == before
