"""The Accelerate config files in configs/ read, through `accelerate launch`'s own parsing, as the set-ups they name."""

import os

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin, prepare_multi_gpu_env

from conftest import REPO_ROOT


CONFIGS = {  # file: (processes over all nodes, nodes, sharded with FSDP2)
    "1gpu.yaml": (1, 1, False),
    "8gpu.yaml": (8, 1, False),
    "2x8gpu.yaml": (16, 2, False),
    "8gpu_fsdp2.yaml": (8, 1, True),
    "2x8gpu_fsdp2.yaml": (16, 2, True),
}


def launch_arguments(name: str):
    """The launcher's arguments after it has merged the config file in, as `accelerate launch` does."""
    arguments = launch_command_parser().parse_args(["--config_file", str(REPO_ROOT / "configs" / name), "train.py"])
    return _validate_launch_command(arguments)[0]


def test_every_config_file_is_listed():
    assert sorted(path.name for path in (REPO_ROOT / "configs").glob("*.yaml")) == sorted(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_launches_its_processes_and_nodes(name):
    num_processes, num_machines, sharded = CONFIGS[name]
    arguments = launch_arguments(name)
    assert (arguments.num_processes, arguments.num_machines) == (num_processes, num_machines)
    assert bool(arguments.use_fsdp) == sharded
    assert bool(arguments.multi_gpu) == (num_processes > 1 and not sharded)
    assert not arguments.cpu


@pytest.mark.parametrize("name", [name for name, (_, _, sharded) in CONFIGS.items() if sharded])
def test_fsdp2_configs_shard_every_vit_custom_layer(name, monkeypatch):
    for key, value in prepare_multi_gpu_env(launch_arguments(name)).items():
        monkeypatch.setenv(key, value)  # what the launcher hands every process
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap == ["ViTCustomLayer"]
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.reshard_after_forward is True
    assert os.environ["ACCELERATE_USE_FSDP"] == "true"
