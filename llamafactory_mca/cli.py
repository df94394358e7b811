"""`llamafactory-mca`: doctor, merge (Megatron checkpoint -> HF), convert (HF -> Megatron checkpoint), plan.

Sub-commands come from the `mca_cli_commands` hook, so plugins can add their own.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from typing import Callable

from llamafactory_mca.hookspecs import hookimpl


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _pth_installed() -> bool:
    import site

    dirs = site.getsitepackages() + [site.getusersitepackages()]
    return any(os.path.isfile(os.path.join(d, "llamafactory_mca.pth")) for d in dirs)


def fp8_support() -> str:
    """doctor's FP8 line: which `fp8_recipe` values run on this machine (checked numerically on the GPU), or why none."""
    try:
        from llamafactory_mca.args import FP8_RECIPES
        from llamafactory_mca.kernels.fp8 import Fp8Recipe, fp8_unsupported_reason

        reasons = {name: fp8_unsupported_reason(Fp8Recipe(name)) for name in FP8_RECIPES}
    except Exception as err:  # noqa: BLE001 - doctor reports, it does not crash
        return f"unavailable: {type(err).__name__}: {err}"
    ok = [name for name, reason in reasons.items() if reason is None]
    if ok:
        return "fp8: true works (fp8_recipe: " + ", ".join(ok) + "; checked on this GPU)" + "".join(
            f"; {name}: {reason}" for name, reason in reasons.items() if reason)
    return "not here: " + reasons["tensorwise"]


def doctor(argv: list[str]) -> int:
    """Print versions, whether activation works here, TE presence and the device; exit 1 if unusable."""
    import subprocess

    from llamafactory_mca import __version__

    rows = [("llamafactory-mca", __version__)]
    rows += [(d, _version(d)) for d in ("llamafactory", "megatron-core", "transformers", "torch", "pluggy")]
    try:
        import torch

        device = f"cuda x{torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu (gloo)"
    except Exception as err:  # noqa: BLE001 - doctor reports, it does not crash
        device = f"torch unusable: {err}"
    from llamafactory_mca.platform import te_available

    rows.append(("transformer_engine", "importable; not used unless asked: transformer_impl: transformer_engine "
                 "(EXPERIMENTAL, untested; the default is the local spec + sdpa)" if te_available()
                 else "absent (the default local spec + sdpa is used)"))
    rows.append(("device", device))
    rows.append(("fp8", fp8_support()))
    rows.append(("activation .pth", "installed" if _pth_installed() else "MISSING (reinstall with pip install .)"))
    # Activation is checked the way a user meets it: a fresh interpreter with USE_MCA=1 that imports the tuner.
    probe = subprocess.run(
        [sys.executable, "-c", "import llamafactory.train.tuner as t; print(getattr(t, '_llamafactory_mca_patched', False))"],
        env={**os.environ, "USE_MCA": "1"},
        capture_output=True,
        text=True,
    )
    active = probe.returncode == 0 and probe.stdout.strip().endswith("True")
    rows.append(("USE_MCA=1 activation", "works" if active else f"FAILS: {probe.stderr.strip()[-400:]}"))
    from llamafactory_mca.plugins import flat, get_plugin_manager, hook

    rows.append(("plugins", ", ".join(sorted(name for name, _ in get_plugin_manager().list_name_plugin()))))
    rows.append(("stages", ", ".join(flat(hook().mca_supported_stages()))))
    rows.append(("model types", ", ".join(flat(hook().mca_supported_model_types()))))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0 if active else 1


def _merge(argv: list[str]) -> int:
    """Merge a Megatron checkpoint (any tp/pp/vpp/ep layout) into HF safetensors + config + tokenizer."""
    from llamafactory_mca.export import merge_command

    return merge_command(argv)


def _convert(argv: list[str]) -> int:
    """Convert an HF model into a Megatron checkpoint for a chosen parallel layout."""
    from llamafactory_mca.export import convert_command

    return convert_command(argv)


def _plan(argv: list[str]) -> int:
    """Memory per rank, global batch and layout search for a recipe on N GPUs, on this CPU."""
    from llamafactory_mca.plan.command import plan_command

    return plan_command(argv)


@hookimpl
def mca_cli_commands() -> dict[str, Callable[[list[str]], int]]:
    """The built-in sub-commands: doctor, merge, convert, plan."""
    return {"doctor": doctor, "merge": _merge, "convert": _convert, "plan": _plan}


def main(argv: list[str] | None = None) -> int:
    """`llamafactory-mca COMMAND ...`: runs a sub-command of any plugin (`mca_cli_commands`)."""
    from llamafactory_mca.plugins import hook

    argv = list(sys.argv[1:] if argv is None else argv)
    commands: dict[str, Callable[[list[str]], int]] = {}
    for chunk in hook().mca_cli_commands():
        for name, fn in chunk.items():
            commands.setdefault(name, fn)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: llamafactory-mca {" + ",".join(sorted(commands)) + "} [options]")
        for name in sorted(commands):
            doc = (commands[name].__doc__ or "").strip().splitlines()
            print(f"  {name:<8} {doc[0] if doc else ''}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return int(commands[argv[0]](argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
