"""The plugin manager: the built-in plugins from an explicit list, then third-party ones from entry points.

Loading is deterministic (as datasette's `plugins.py` does it):

1. every module of `DEFAULT_PLUGINS` is registered under its module name, so a source checkout that is not
   pip-installed has every built-in, and no entry point can disable one;
2. then every entry point of the `llamafactory_mca` group, sorted by (distribution, entry-point name). An entry
   point whose name is already registered, or whose object is (a built-in still listed by an older
   installation's metadata), is skipped.

pluggy calls the implementations registered last first, so a third-party `firstresult` hook (`mca_workflow`
...) is asked before ours; the built-in model bridges are in addition marked `trylast`, so a third-party bridge
for the same `model_type` always wins. `LLAMAFACTORY_MCA_TRACE=1` prints every hook call.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import sys

import pluggy

from llamafactory_mca import hookspecs
from llamafactory_mca.hookspecs import PROJECT

# The built-in plugins: modules holding `@hookimpl` functions.
DEFAULT_PLUGINS = (
    "llamafactory_mca.arg_hooks",
    "llamafactory_mca.workflows",
    "llamafactory_mca.models.registry",
    "llamafactory_mca.cli",
)


def _entry_points_sorted() -> list:
    """The entry points of our group, in a fixed order: by distribution name, then entry-point name."""
    found = []
    for dist in importlib.metadata.distributions():
        dist_name = (dist.metadata["Name"] or "") if dist.metadata is not None else ""
        for ep in dist.entry_points:
            if ep.group == PROJECT:
                found.append((dist_name.lower(), ep.name, ep))
    found.sort(key=lambda item: (item[0], item[1]))
    return [ep for _, _, ep in found]


def load_entry_point_plugins(pm: pluggy.PluginManager) -> int:
    """Register the third-party plugins of the `llamafactory_mca` entry-point group; returns how many.

    Skipped: entry points whose name is taken or blocked, and objects already registered under another name.
    """
    count = 0
    for ep in _entry_points_sorted():
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        plugin = ep.load()
        if pm.is_registered(plugin):
            continue
        pm.register(plugin, name=ep.name)
        count += 1
    return count


@functools.lru_cache(maxsize=None)
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager: `DEFAULT_PLUGINS`, then the entry-point plugins (module docstring)."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    load_entry_point_plugins(pm)
    if os.environ.get("LLAMAFACTORY_MCA_TRACE") == "1":
        pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
        pm.enable_tracing()
    return pm


def hook() -> pluggy.HookRelay:
    """The hook relay of the process-wide plugin manager (`hook().mca_model_bridge(hf_config=...)` ...)."""
    return get_plugin_manager().hook


def flat(results: list[list]) -> list:
    """Concatenate the list results of a non-firstresult hook, dropping duplicates, keeping order."""
    out: list = []
    for chunk in results:
        for item in chunk or []:
            if item not in out:
                out.append(item)
    return out
