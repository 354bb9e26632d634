"""Scale-out: the FSDP accelerate config (read back by accelerate itself) and the offloaded engine on the CPU."""
from __future__ import annotations

import pytest
import torch
import yaml

from tierprune.errors import TierpruneError
from tierprune.scale_out import fsdp_accelerate_config, fsdp_layer_classes, write_accelerate_config


def test_generated_fsdp_config_is_what_accelerate_reads(tmp_path, tiny_llama):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    path = write_accelerate_config(tmp_path / "fsdp.yaml", num_processes=8, layer_classes=fsdp_layer_classes(tiny_llama))
    parsed = ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader: unknown keys are refused
    assert parsed.distributed_type == DistributedType.FSDP and parsed.num_processes == 8
    assert parsed.mixed_precision == "bf16" and parsed.num_machines == 1
    fsdp = parsed.fsdp_config
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert fsdp["fsdp_use_orig_params"] is True and fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert "main_process_ip" not in yaml.safe_load(path.read_text())


def test_two_machines_need_the_main_address_and_even_processes():
    two = fsdp_accelerate_config(num_processes=16, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1",
                                 layer_classes=["LlamaDecoderLayer"])
    assert (two["num_machines"], two["machine_rank"], two["main_process_ip"]) == (2, 1, "10.0.0.1")
    with pytest.raises(TierpruneError, match="main machine"):
        fsdp_accelerate_config(num_processes=16, num_machines=2, layer_classes=["X"])
    with pytest.raises(TierpruneError, match="evenly"):
        fsdp_accelerate_config(num_processes=3, num_machines=2, main_process_ip="h", layer_classes=["X"])
    with pytest.raises(TierpruneError, match="machine rank"):
        fsdp_accelerate_config(num_processes=2, machine_rank=1, layer_classes=["X"])


def test_a_model_without_layer_classes_is_one_clear_error():
    with pytest.raises(TierpruneError, match="_no_split_modules"):
        fsdp_layer_classes(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("pattern, method", [("unstructured", "wanda"), ("tiers", "wanda"), ("2:4", "sparsegpt")])
def test_offloaded_engine_prunes_exactly_like_the_resident_one(pattern, method):
    """--offload keeps the model on the CPU and streams one layer at a time through the device: same result."""
    from tests.conftest import make_tiny_llama
    from tierprune.config import PruneConfig
    from tierprune.tasks.prune import prune_model_

    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig(method=method, pattern=pattern, tiers=(0.35, 0.45, 0.20))
    resident, offloaded = make_tiny_llama(), make_tiny_llama()
    a = prune_model_(resident, cfg, calib, batch_size=2, device="cpu", offload=False)
    b = prune_model_(offloaded, cfg, calib, batch_size=2, device="cpu", offload=True)
    for (name, x), y in zip(resident.state_dict().items(), offloaded.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    assert set(a.tier_maps) == set(b.tier_maps)
    assert all(torch.equal(a.tier_maps[n], b.tier_maps[n]) for n in a.tier_maps)
    zeros = sum(int((p == 0).sum()) for n, p in offloaded.named_parameters() if "proj" in n)
    assert zeros > 0  # it did prune
