"""Test-only start-up shim for the Hugging Face reference runs of Qwen2-VL (put on PYTHONPATH by tests).

LLaMA-Factory 0.9.5's `load_model` refuses models with Conv3D under torch 2.9.x (a GPU performance guard,
pytorch/pytorch#166122); Qwen2-VL's patch embedding is a Conv3D. The reference run on CPU is not affected, so
this shim makes the guard's version test answer False for "2.9.0" once `llamafactory.model.loader` is imported.
"""

import importlib.abc
import importlib.util
import sys

_TARGET = "llamafactory.model.loader"


class _LiftConv3dGuard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            original = module.is_torch_version_greater_than
            module.is_torch_version_greater_than = lambda v: False if v == "2.9.0" else original(v)

        spec.loader.exec_module = patched
        return spec


sys.meta_path.insert(0, _LiftConv3dGuard())
