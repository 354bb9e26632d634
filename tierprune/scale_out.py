"""Scale-out settings for users who outgrow one GPU: the accelerate config for FSDP fine-tuning.

`accelerate launch --config_file fsdp.yaml ...` reads this file. Each decoder layer is one FSDP unit
(wrapped by class name, the model's `_no_split_modules`), parameters are sharded (FULL_SHARD) and keep
their original names and shapes (`use_orig_params`), so that every rank can apply the stored keep masks to
its shard after each optimizer step and a masked weight stays zero however the model is sharded. State dicts
are gathered whole on save, the form the run store's checkpoints take.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from torch import nn

from .errors import TierpruneError

__all__ = ["fsdp_layer_classes", "fsdp_accelerate_config", "write_accelerate_config"]


def fsdp_layer_classes(model: nn.Module) -> list[str]:
    """The class names FSDP wraps one by one: the model's decoder layers (transformers' `_no_split_modules`)."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise TierpruneError(f"{type(model).__name__} does not name its decoder layer class (_no_split_modules); "
                             "give the layer classes explicitly")
    return names


def fsdp_accelerate_config(*, num_processes: int, layer_classes: list[str], num_machines: int = 1,
                           machine_rank: int = 0, main_process_ip: str | None = None, main_process_port: int = 29500,
                           mixed_precision: Literal["no", "bf16", "fp16"] = "bf16",
                           offload_params: bool = False) -> dict:
    """accelerate's config (as `accelerate config` writes it) for FSDP over num_processes GPUs in all."""
    if num_processes < 1 or num_machines < 1 or num_processes % num_machines:
        raise TierpruneError(f"{num_processes} processes do not split evenly over {num_machines} machines")
    if not 0 <= machine_rank < num_machines:
        raise TierpruneError(f"machine rank {machine_rank} is not one of 0..{num_machines - 1}")
    if num_machines > 1 and not main_process_ip:
        raise TierpruneError("several machines need the main machine's address (main_process_ip)")
    if not layer_classes:
        raise TierpruneError("FSDP needs the decoder layer class names to wrap")
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP",
        "mixed_precision": mixed_precision,
        "downcast_bf16": "no",
        "num_machines": num_machines,
        "num_processes": num_processes,
        "machine_rank": machine_rank,
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "use_cpu": False,
        "fsdp_config": {
            "fsdp_version": 1,
            "fsdp_sharding_strategy": "FULL_SHARD",
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": ",".join(layer_classes),
            # Original parameters: masks are indexed by the parameter's name and (out, in) shape.
            "fsdp_use_orig_params": True,
            "fsdp_offload_params": offload_params,
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_forward_prefetch": False,
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_sync_module_states": True,  # rank 0 loads the checkpoint, the others receive it
            "fsdp_state_dict_type": "FULL_STATE_DICT",
        },
    }
    if num_machines > 1:
        config.update(main_process_ip=main_process_ip, main_process_port=main_process_port)
    return config


def write_accelerate_config(path: str | Path, **settings) -> Path:
    """Write fsdp_accelerate_config(**settings) as YAML for `accelerate launch --config_file PATH`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(fsdp_accelerate_config(**settings), sort_keys=False))
    return path
