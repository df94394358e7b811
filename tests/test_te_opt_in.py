"""`transformer_impl: auto` stays on the tested local path where Transformer Engine imports; the TE spec is opt-in.

A stand-in `transformer_engine` package on sys.path makes TE "importable" (te_available() is True); megatron's TE
spec itself is never built here (no TE on our machines), only the choice is checked. The stand-in goes on the path
after megatron-core is imported: megatron probes TE's version and internals at import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import worktree_env

PROBE = textwrap.dedent(
    """
    import importlib, sys
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.spec import use_transformer_engine
    from llamafactory_mca.platform import te_available

    # megatron-core is imported without TE (it would probe the stand-in's internals); then TE becomes importable
    sys.path.insert(0, sys.argv[1])
    importlib.invalidate_caches()

    print("TE_IMPORTABLE", te_available())
    for settings in ({}, {"transformer_impl": "auto"}, {"transformer_impl": "local"}, {"attention_backend": "sdpa"},
                     {"transformer_impl": "transformer_engine"}, {"attention_backend": "te"}):
        print("SPEC", sorted(settings.items()), use_transformer_engine(MegatronArguments(**settings)))
    """
)


def test_default_does_not_switch_to_te_when_te_imports(tmp_path):
    te = tmp_path / "transformer_engine"
    (te / "pytorch").mkdir(parents=True)
    (te / "__init__.py").write_text("")
    (te / "pytorch" / "__init__.py").write_text("")
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], env=worktree_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("TE_", "SPEC")))
    assert lines["TE_IMPORTABLE"] == "True"
    spec = [line for line in proc.stdout.splitlines() if line.startswith("SPEC")]
    assert spec == [
        "SPEC [] False",
        "SPEC [('transformer_impl', 'auto')] False",
        "SPEC [('transformer_impl', 'local')] False",
        "SPEC [('attention_backend', 'sdpa')] False",
        "SPEC [('transformer_impl', 'transformer_engine')] True",
        "SPEC [('attention_backend', 'te')] True",
    ]


def test_te_spec_asked_without_te_names_the_key():
    import pytest

    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.spec import use_transformer_engine

    with pytest.raises(ValueError, match="`transformer_impl`: 'transformer_engine' but transformer_engine does not "
                                         "import. Fix:"):
        use_transformer_engine(MegatronArguments(transformer_impl="transformer_engine"))
    with pytest.raises(ValueError, match="`attention_backend`: 'te'"):
        use_transformer_engine(MegatronArguments(attention_backend="te"))
