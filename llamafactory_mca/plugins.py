"""The plugin manager: built-ins and third-party plugins, both found through the entry-point group."""

from __future__ import annotations

import functools
import os
import sys

import pluggy

from llamafactory_mca import hookspecs
from llamafactory_mca.hookspecs import PROJECT


@functools.lru_cache(maxsize=None)
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every plugin of the `llamafactory_mca` entry-point group loaded.

    Our own modules are listed in that group in pyproject.toml, exactly as a third-party plugin would list
    its own, so there is one registration path for both.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(PROJECT)
    # The argument hooks moved out of `args` (now plain data); an installation whose entry-point metadata
    # predates that still names `llamafactory_mca.args`.
    import llamafactory_mca.arg_hooks as arg_hooks

    if not pm.is_registered(arg_hooks):
        pm.register(arg_hooks, name="llamafactory_mca.arg_hooks")
    if os.environ.get("LLAMAFACTORY_MCA_TRACE") == "1":
        pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
        pm.enable_tracing()
    return pm


def hook() -> pluggy.HookRelay:
    return get_plugin_manager().hook


def flat(results: list[list]) -> list:
    """Concatenate the list results of a non-firstresult hook, dropping duplicates, keeping order."""
    out: list = []
    for chunk in results:
        for item in chunk or []:
            if item not in out:
                out.append(item)
    return out
