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


def test_builtins_register_through_the_same_entry_point_group():
    code = (
        "from importlib.metadata import entry_points\n"
        "print(sorted(ep.value for ep in entry_points(group='llamafactory_mca')))\n"
    )
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    for module in ("llamafactory_mca.args", "llamafactory_mca.workflows", "llamafactory_mca.models.registry",
                   "llamafactory_mca.cli"):
        assert module in proc.stdout
