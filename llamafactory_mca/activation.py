"""How we enter LLaMA-Factory: environment hand-off and the post-import patch of its tuner.

Flow, in every process:
1. The user sets `USE_MCA=1`. We hide it from LLaMA-Factory (0.9.4+ raises ImportError at import when
   `USE_MCA` is set and its own `mcore_adapter` is missing, and would otherwise run its own MCA branch) and
   set our marker `LLAMAFACTORY_MCA_ACTIVE=1` instead, which torchrun children inherit.
2. `FORCE_TORCHRUN=1` keeps LLaMA-Factory's launcher on torchrun, as its own USE_MCA mode does.
3. A meta-path finder waits for `llamafactory.train.tuner` and, right after that module has executed,
   replaces its training entry points (see `patching.py`). In the process where the user set USE_MCA it also
   wraps `llamafactory.cli.main`, so `llamafactory-cli train` checks the whole recipe before torchrun starts
   and before torch is imported (`prelaunch.py`). The launcher's torchrun child runs
   `llamafactory/launcher.py` as a script, so nothing here may depend on `llamafactory.cli` being imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType

MARKER = "LLAMAFACTORY_MCA_ACTIVE"
TRUTHY = ("1", "true", "y", "yes", "on")

# module name -> function(module) run right after the module has executed
_POST_IMPORT: dict[str, Callable[[ModuleType], None]] = {}


def is_enabled(name: str) -> bool:
    return os.environ.get(name, "").lower() in TRUTHY


def is_active() -> bool:
    """True in a process where our backend replaces LLaMA-Factory's training."""
    return os.environ.get(MARKER) == "1"


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs a callback once a watched module has finished executing."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 (importlib protocol)
        if fullname not in _POST_IMPORT:
            return None
        # Ask the rest of sys.meta_path for the real spec, then wrap its loader.
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, _POST_IMPORT[fullname])
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader, callback: Callable[[ModuleType], None]) -> None:
        self._wrapped = wrapped
        self._callback = callback

    def create_module(self, spec):  # noqa: ANN001
        return self._wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._wrapped.exec_module(module)
        self._callback(module)


def when_imported(module_name: str, callback: Callable[[ModuleType], None]) -> None:
    """Run `callback(module)` right after `module_name` is imported (or now, if it already is)."""
    if module_name in sys.modules:
        callback(sys.modules[module_name])
        return
    _POST_IMPORT[module_name] = callback
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())


def has_nvidia_devices() -> bool:
    """Whether this machine has NVIDIA GPUs, from the device node (keeps torch out of start-up)."""
    return os.path.exists("/dev/nvidiactl")


def _default_nproc() -> None:
    """LLaMA-Factory's launcher asks torchrun for one process per GPU; on a CPU machine that is 0.
    (Also: no CUDA allocator settings for the children of a CPU machine.)

    A device-node check instead of `torch.cuda` keeps torch out of start-up.
    """
    if not has_nvidia_devices():
        os.environ.setdefault("NPROC_PER_NODE", "1")
        # the launcher's CUDA allocator settings mean nothing here, and torch warns that one is deprecated
        os.environ.setdefault("OPTIM_TORCH", "0")


def activate() -> None:
    """Switch this process (and, through the environment, its children) to the Megatron backend."""
    first_process = is_enabled("USE_MCA")
    os.environ.pop("USE_MCA", None)
    os.environ[MARKER] = "1"
    os.environ["FORCE_TORCHRUN"] = "1"
    if first_process:
        _default_nproc()

    from llamafactory_mca.log import quiet_third_party
    from llamafactory_mca.patching import patch_cli, patch_tuner, patch_v1_launcher

    quiet_third_party()
    if first_process:  # the launching process: the recipe is checked before torchrun starts
        when_imported("llamafactory.cli", patch_cli)
    when_imported("llamafactory.train.tuner", patch_tuner)
    when_imported("llamafactory.v1.launcher", patch_v1_launcher)
