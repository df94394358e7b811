"""The exact LLaMA-Factory names we replace, and the check that they exist (fail closed).

Patch points, the same in LLaMA-Factory 0.9.4, 0.9.5 and main (checked at patch time, not assumed):
- `llamafactory.train.tuner._training_function(config)`: run_exp's non-Ray training entry.
- `llamafactory.train.tuner._ray_training_function` (0.9.5+): refused, Ray is not supported under USE_MCA.
  (0.9.4 wraps `_training_function` itself in Ray; ours refuses USE_RAY there.)
- `llamafactory.train.tuner.get_train_args`: run_exp calls it for `-h`; ours lists our keys as well.
- `llamafactory.train.tuner.export_model`: `llamafactory-cli export` of a Megatron checkpoint.
- `llamafactory.cli.main` (launching process only): `train` checks the recipe and starts torchrun itself
  (`prelaunch.py`, `torchrun_launch.py`, whose stdout filter drops gloo's C++ connection lines, see `log.py`).
- `llamafactory.v1.launcher.launch`: refused, the v1 trainer (USE_V1) is not supported under USE_MCA.
"""

from __future__ import annotations

from types import ModuleType

TUNER_NAMES = ("_training_function", "get_train_args", "export_model", "run_exp")


class McaPatchError(RuntimeError):
    """LLaMA-Factory's code does not have the names we replace: stop rather than train with the HF path."""


def _llamafactory_version() -> str:
    try:
        from importlib.metadata import version

        return version("llamafactory")
    except Exception:  # noqa: BLE001 - a version string is all we want here
        return "unknown"


def patch_tuner(tuner: ModuleType) -> None:
    missing = [name for name in TUNER_NAMES if not hasattr(tuner, name)]
    if missing:
        raise McaPatchError(
            f"llamafactory-mca cannot enter LLaMA-Factory {_llamafactory_version()}: "
            f"llamafactory.train.tuner has no {', '.join(missing)}. USE_MCA=1 was set, so training is stopped "
            "instead of silently running the Hugging Face path. Supported: llamafactory 0.9.4, 0.9.5 and main "
            "of that time; upgrade llamafactory-mca or unset USE_MCA."
        )
    from llamafactory_mca import launch

    setattr(tuner, launch.UPSTREAM_TRAINING_FUNCTION, tuner._training_function)  # its callback list is reused
    tuner._training_function = launch.training_function
    if hasattr(tuner, "_ray_training_function"):
        tuner._ray_training_function = launch.refuse_ray
    tuner.get_train_args = launch.get_train_args_for_help
    tuner.export_model = launch.wrap_export(tuner.export_model)
    tuner._llamafactory_mca_patched = True


def patch_cli(cli: ModuleType) -> None:
    """`llamafactory-cli` checks a training recipe before anything else (see `prelaunch.py`)."""
    if not hasattr(cli, "main"):
        raise McaPatchError(
            f"llamafactory-mca cannot enter LLaMA-Factory {_llamafactory_version()}: llamafactory.cli has no main. "
            "Supported: llamafactory 0.9.4, 0.9.5; upgrade llamafactory-mca or unset USE_MCA."
        )
    from llamafactory_mca.prelaunch import checked_main

    cli.main = checked_main(cli.main)


def patch_v1_launcher(v1_launcher: ModuleType) -> None:
    from llamafactory_mca import launch

    v1_launcher.launch = launch.refuse_v1
