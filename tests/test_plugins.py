"""A third-party plugin announced through the `llamafactory_mca` entry-point group is picked up."""

from __future__ import annotations

import textwrap

from conftest import run_py


def _make_plugin(root):
    (root / "acme_mca_plugin.py").write_text(textwrap.dedent(
        """
        from dataclasses import dataclass, field
        from llamafactory_mca import hookspecs

        @dataclass
        class AcmeArguments:
            acme_knob: int = field(default=0, metadata={"help": "An acme setting."})

        @hookspecs.hookimpl
        def mca_argument_dataclasses():
            return [AcmeArguments]

        @hookspecs.hookimpl
        def mca_supported_model_types():
            return ["acme_arch"]

        @hookspecs.hookimpl
        def mca_validate_args(mca_args, lf_args, world_size):
            if mca_args[AcmeArguments].acme_knob < 0:
                raise ValueError("`acme_knob` must be >= 0")
        """
    ))
    dist = root / "acme_mca_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-mca-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[llamafactory_mca]\nacme = acme_mca_plugin\n")


def test_third_party_plugin_is_loaded_through_entry_points(tmp_path):
    _make_plugin(tmp_path)
    code = textwrap.dedent(
        f"""
        from llamafactory_mca.plugins import flat, hook, get_plugin_manager
        from llamafactory_mca.parsing import parse_train_args
        print("TYPES", flat(hook().mca_supported_model_types()))
        recipe = dict(model_name_or_path="none", stage="sft", do_train=True, finetuning_type="full", dataset="identity",
                      template="default", overwrite_output_dir=True, output_dir={str(tmp_path / 'out')!r})
        mca, _ = parse_train_args(dict(recipe, acme_knob=3))
        print("KNOB", [v.acme_knob for k, v in mca.items() if k.__name__ == "AcmeArguments"])
        try:
            parse_train_args(dict(recipe, acme_knob=-1))
        except ValueError as err:
            print("ERROR", err)
        """
    )
    proc = run_py(code, PYTHONPATH=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "acme_arch" in proc.stdout and "llama" in proc.stdout  # the plugin's and the built-in bridges
    assert "KNOB [3]" in proc.stdout
    assert "ERROR `acme_knob` must be >= 0" in proc.stdout


def test_builtins_are_present_without_any_entry_point():
    """A source checkout that is not pip-installed (no entry points at all) still has every built-in."""
    code = textwrap.dedent(
        """
        import importlib.metadata
        importlib.metadata.distributions = lambda *a, **k: iter(())
        from llamafactory_mca.plugins import DEFAULT_PLUGINS, flat, get_plugin_manager, hook
        pm = get_plugin_manager()
        print("REGISTERED", sorted(name for name, _ in pm.list_name_plugin()))
        print("TYPES", flat(hook().mca_supported_model_types()))
        print("STAGES", flat(hook().mca_supported_stages()))
        print("COMMANDS", sorted(k for d in hook().mca_cli_commands() for k in d))
        print("ARGS", [t.__name__ for t in flat(hook().mca_argument_dataclasses())])
        """
    )
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for module in ("llamafactory_mca.arg_hooks", "llamafactory_mca.workflows", "llamafactory_mca.models.registry",
                   "llamafactory_mca.cli"):
        assert f"'{module}'" in out
    for model_type in ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "qwen2_vl", "qwen2_5_vl"):
        assert f"'{model_type}'" in out
    assert "'sft'" in out and "'pt'" in out and "'dpo'" in out
    assert "'merge'" in out and "'convert'" in out and "'doctor'" in out
    assert "MegatronArguments" in out


def _make_bridge_plugin(root, entry_point_name: str):
    (root / "acme_bridge_plugin.py").write_text(textwrap.dedent(
        """
        from llamafactory_mca import hookspecs
        from llamafactory_mca.models.llama import LlamaBridge

        class AcmeLlamaBridge(LlamaBridge):
            pass

        @hookspecs.hookimpl
        def mca_model_bridge(hf_config):
            return AcmeLlamaBridge() if hf_config.model_type == "llama" else None
        """
    ))
    dist = root / "acme_bridge_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-bridge-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[llamafactory_mca]\n{entry_point_name} = acme_bridge_plugin\n")


def test_third_party_bridge_overrides_a_builtin_one(tmp_path):
    """An entry point with the generic name `models` neither disables the built-in bridges nor loses to them."""
    _make_bridge_plugin(tmp_path, "models")
    code = textwrap.dedent(
        """
        from transformers import LlamaConfig, Qwen3Config
        from llamafactory_mca.models import get_bridge
        from llamafactory_mca.plugins import flat, hook
        print("LLAMA", type(get_bridge(LlamaConfig())).__name__)
        print("QWEN3", type(get_bridge(Qwen3Config())).__name__)
        print("STAGES", flat(hook().mca_supported_stages()))
        """
    )
    proc = run_py(code, PYTHONPATH=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "LLAMA AcmeLlamaBridge" in proc.stdout
    assert "QWEN3 Qwen3Bridge" in proc.stdout  # the built-in registry is still there
    assert "'sft'" in proc.stdout
