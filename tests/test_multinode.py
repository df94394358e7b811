"""Multi-node launch as LLaMA-Factory users do it: two torchrun "nodes" on this machine (NNODES/NODE_RANK).

Activation happens in every process, so both nodes' children train with Megatron; the run must equal the same
layout launched on one node (same ranks, same math: bit-identical losses).
"""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from conftest import REPO, clean_env
from lf_runs import losses, make_models, make_recipe, train

from llamafactory_mca.torchrun_launch import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory)


def test_two_nodes_equal_one_node(models, tmp_path):
    layout = dict(tensor_model_parallel_size=2, save_hf_model=False)
    one_node = train(tmp_path, "one_node", make_recipe(models["dense"], str(tmp_path / "one"), **layout), nproc=2)

    recipe_path = tmp_path / "two_nodes.yaml"
    recipe_path.write_text(yaml.safe_dump(make_recipe(models["dense"], str(tmp_path / "two"), **layout)))
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            ["llamafactory-cli", "train", str(recipe_path)],
            env=clean_env(USE_MCA="1", PYTHONPATH=REPO, NNODES="2", NODE_RANK=str(rank), NPROC_PER_NODE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path),
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=900) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
    assert "data-parallel" in outputs[0][0] + outputs[0][1]  # the global-batch rule is logged at start
    two_nodes = losses(str(tmp_path / "two"))
    assert two_nodes == losses(one_node) and len(two_nodes) > 0
    assert os.path.isfile(os.path.join(tmp_path / "two", "trainer_log.jsonl"))
