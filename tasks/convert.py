"""A pruned model as a packed hybrid model: HybridLinear layers in a folder that loads back packed or dense.

`convert` reads one finished iteration of a run (checkpoint, tier table and masks, as `runs export` does),
a folder that `tierprune runs export` (or `prune --pattern tiers --output`) wrote with its tier maps, or any
other pruned model folder (`prune --pattern 2:4 --output`, a checkpoint pruned elsewhere), whose blocks each
get the cheapest tier that holds their zeros exactly. It packs every prunable linear in the hybrid Dense /
2:4 / TopK format and writes:
  config.json, generation_config.json, tokenizer files   as transformers writes them
  hybrid.safetensors   the state dict of the converted model: packed buffers of each HybridLinear
                       (with its `hybrid_layout`), every other tensor as it is; tied tensors stored once
  hybrid.json          format, block size, topk, dtype, which modules are packed, their bytes
  model.safetensors    only with dense=True: the dense-with-zeros model, so that plain transformers
                       (`AutoModelForCausalLM.from_pretrained(DIR)`) loads the folder without tierprune
Without the dense copy, `from_pretrained(DIR)` fails loudly (no model.safetensors) rather than loading
random weights; `load_dense(DIR)` expands the packed file into a plain transformers model instead.
Nothing is written when a weight breaks its tier map.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from tierprune.adapters import weight_view
from tierprune.errors import TierpruneError
from tierprune.hybrid_linear import HybridLinear, convert_model_, dense_state_dict, prepare_hybrid_
from tierprune.kernels.tiers import DENSE, TOPK, tier_counts, tier_violations
from tierprune.models import ALIASES, PACKED_LAYOUT_FILE, load_model, refuse_other_model_in_folder, resolve_dtype
from tierprune.storage.checkpoints import save_pretrained_dir
from tierprune.storage.tables import file_exists, load_file, save_file

from .export import load_iteration
from .prune import named_linears, tier_maps_from_zeros
from .runs import split_run_uri
from .tier_tables import tier_maps_from_table

__all__ = ["HYBRID_FORMAT", "convert", "load_hybrid", "load_dense", "load_folder_model", "target_dtype"]

HYBRID_FORMAT = "tierprune-hybrid/1"
PACKED_FILE, LAYOUT_FILE = "hybrid.safetensors", PACKED_LAYOUT_FILE  # LAYOUT_FILE: what marks a packed folder
_BLOCK_SIZES = (16, 8)  # what pack_hybrid takes
INFERRED_BLOCK_SIZE = 16  # the kernels' block size, for models that come without tier maps
DEFAULT_TOPK = 10  # the method's k, for models that come without tier maps


def _infer_block_size(linears: dict[str, nn.Module], maps: dict[str, torch.Tensor]) -> int:
    """The block size that gives every module's weight its tier map's shape (an export folder does not say)."""
    for bs in _BLOCK_SIZES:
        if all(tuple(maps[n].shape) == (-(-weight_view(m).shape[0] // bs), -(-weight_view(m).shape[1] // bs))
               for n, m in linears.items()):
            return bs
    name = next(iter(linears))
    raise TierpruneError(f"the tier maps do not fit the model with {' or '.join(map(str, _BLOCK_SIZES))}x blocks "
                         f"(e.g. {name}: weight {tuple(weight_view(linears[name]).shape)}, tier map "
                         f"{tuple(maps[name].shape)})")


def _infer_topk(linears: dict[str, nn.Module], maps: dict[str, torch.Tensor], block_size: int) -> int:
    """The most non-zeros of any TopK block: the smallest k that packs the folder losslessly (the run's k)."""
    from tierprune.kernels.masks import to_blocks

    most = 1  # a model whose TopK blocks are all zeros (topk 0) still packs with one zero slot per block
    for name, module in linears.items():
        topk_blocks = (maps[name] == TOPK).flatten()
        if topk_blocks.any():
            nonzeros = (to_blocks(weight_view(module), block_size) != 0).sum(-1)  # (nblocks,)
            most = max(most, int(nonzeros[topk_blocks.to(nonzeros.device)].max()))
    return most


def load_folder_model(folder: str):
    """The model of a from_pretrained folder, in the dtype its weights are stored in (not "auto")."""
    config = load_file(f"{folder}/config.json") if file_exists(f"{folder}/config.json") else {}
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return load_model(folder, dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "float32")


def _load_export_folder(folder: str, topk: int | None) -> tuple[nn.Module, object, dict[str, torch.Tensor], int, int]:
    """(model, tokenizer, tier maps, block size, topk) of a `runs export` folder; topk None: inferred."""
    loaded = load_folder_model(folder)
    maps = tier_maps_from_table(load_file(f"{folder}/tier_maps.parquet"))
    linears = named_linears(loaded.model)
    if set(maps) != set(linears):
        missing, extra = sorted(set(linears) - set(maps)), sorted(set(maps) - set(linears))
        raise TierpruneError(f"{folder}/tier_maps.parquet does not match the model: modules without a tier map "
                             f"{missing[:3]}, unknown modules {extra[:3]}")
    block_size = _infer_block_size(linears, maps)
    topk = _infer_topk(linears, maps, block_size) if topk is None else topk
    for name, module in linears.items():
        groups, blocks = tier_violations(weight_view(module), maps[name], block_size, topk)
        if groups or blocks:
            raise TierpruneError(f"{name} does not obey its tier map ({groups} 2:4 groups, {blocks} TopK blocks "
                                 f"over {topk} non-zeros)")
    return loaded.model, loaded.tokenizer, maps, block_size, topk


def _load_pruned_folder(folder: str, topk: int | None) -> tuple[nn.Module, object, dict[str, torch.Tensor], int, int]:
    """(model, tokenizer, tier maps, block size, topk) of a model without tier maps (a `prune --pattern 2:4` or
    `block` folder, a checkpoint pruned elsewhere, a hub id): each block gets the cheapest tier that holds its
    zeros exactly."""
    try:
        loaded = load_folder_model(folder)
    except TierpruneError as exc:
        if file_exists(f"{folder}/config.json"):
            raise
        raise TierpruneError(f"{folder} is neither a run, a model folder, nor a model that --model loads: "
                             f"{exc}") from None
    topk = DEFAULT_TOPK if topk is None else topk
    maps = tier_maps_from_zeros(loaded.model, INFERRED_BLOCK_SIZE, topk)
    counts = sum(tier_counts(t) for t in maps.values())
    if not maps or int(counts[DENSE]) == int(counts.sum()):
        raise TierpruneError(f"{folder} has no tier_maps.parquet, and none of its {INFERRED_BLOCK_SIZE}x"
                             f"{INFERRED_BLOCK_SIZE} weight blocks is 2:4 or has at most {topk} non-zeros: "
                             "nothing to pack (is it a pruned model? `tierprune prune --output` writes one)")
    return loaded.model, loaded.tokenizer, maps, INFERRED_BLOCK_SIZE, topk


def _names_a_model(source: str) -> bool:
    """Whether source is what `--model` takes without a folder here: an alias, a .gguf file or a hub id."""
    if source in ALIASES or source.endswith(".gguf"):
        return True
    if "://" in source or source.startswith((".", "/", "~")) or Path(source).exists():
        return False  # a path, here or remote: the folder checks say what is missing
    return re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None  # owner/name


def _dedup_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tensors that share storage (tied embeddings) kept once, under their first name."""
    seen: set[tuple[int, int]] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else (id(tensor), 0)
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor
    return state


def target_dtype(name: str) -> torch.dtype | None:
    """The dtype a `--dtype` of convert or generate asks for: None for "stored" (the source's own)."""
    if name == "stored":
        return None
    if name != "auto":
        try:
            return resolve_dtype(name, "cpu")
        except TierpruneError:
            pass
    raise TierpruneError(f"--dtype {name}: use stored, bfloat16, float16 or float32")


def convert(source: str, output: str, iteration: int | None = None, *, topk: int | None = None,
            dense: bool = False, dtype: str = "stored") -> dict:
    """Convert a run's iteration (`STORE/RUN`) or a `runs export` folder to a packed model folder at `output`.

    topk: weights per TopK block. A run knows its own; an export folder does not say it, so by default it is
    the most non-zeros of any TopK block there (the run's k, unless every such block kept fewer).
    dtype: "stored" keeps the source's; e.g. bfloat16 packs a CPU run's fp32 weights at half the bytes, in the
    dtype the GPU kernels run (a cast keeps every zero, so the tier maps still hold).
    Returns what was written, with the bytes of the packed linears and of the same linears dense.
    """
    source = source.rstrip("/")
    output = output.rstrip("/")
    refuse_other_model_in_folder(output, dense=dense, packed=True)  # before the model is loaded
    cast_to = target_dtype(dtype)
    if topk is not None and not 0 <= topk <= max(_BLOCK_SIZES) ** 2:
        raise TierpruneError(f"--topk {topk}: weights kept per TopK block, 0..{max(_BLOCK_SIZES) ** 2}")
    if file_exists(f"{source}/tier_maps.parquet"):
        if iteration is not None:
            raise TierpruneError(f"--iteration applies to a run, but {source} is an exported folder (one iteration)")
        model, tokenizer, maps, block_size, topk = _load_export_folder(source, topk)
        done_iteration = None
        tiers_from = "tier_maps.parquet"
    elif not file_exists(f"{source}/manifest.json") and (file_exists(f"{source}/config.json")
                                                          or _names_a_model(source)):
        if file_exists(f"{source}/{LAYOUT_FILE}"):
            raise TierpruneError(f"{source} is already a packed model folder ({LAYOUT_FILE}); load it with "
                                 "tierprune.tasks.convert.load_hybrid")
        if iteration is not None:
            raise TierpruneError(f"--iteration applies to a run, but {source} is a model folder (one model)")
        model, tokenizer, maps, block_size, topk = _load_pruned_folder(source, topk)
        done_iteration = None
        tiers_from = "zeros"
    else:
        if not file_exists(f"{source}/manifest.json"):
            raise TierpruneError(f"{source} is neither a run (STORE/RUN with a manifest.json) nor a model folder "
                                 "(with a config.json, from `tierprune runs export` or `prune --output`)")
        tiers_from = "run"
        it = load_iteration(split_run_uri(source), iteration)
        if topk is not None and topk != it.topk:
            raise TierpruneError(f"--topk {topk}: run {source} was pruned with topk {it.topk}")
        model, tokenizer, block_size, topk = it.model, it.tokenizer, it.block_size, it.topk
        maps = tier_maps_from_table(it.tier_table)
        done_iteration = it.row["iteration"]
    if topk > block_size ** 2:
        raise TierpruneError(f"--topk {topk}: a {block_size}x{block_size} block holds {block_size ** 2} weights")
    if topk < 1:
        topk = 1  # topk 0 removed TopK blocks entirely; one zero slot per block keeps them packable
    if cast_to is not None:
        model.to(cast_to)
    originals = {name: model.get_submodule(name) for name in maps}
    dense_bytes = sum(weight_view(m).numel() * weight_view(m).element_size() for m in originals.values())
    names = convert_model_(model, maps, block_size=block_size, topk=topk)  # refuses before anything is written
    modules = {}
    for name in names:
        hybrid: HybridLinear = model.get_submodule(name)
        modules[name] = {"shape": [hybrid.out_features, hybrid.in_features], "transposed": hybrid.transposed,
                         "blocks": list(hybrid.hybrid_weight().tier_counts()), "nbytes": hybrid.nbytes}
    packed_bytes = sum(m["nbytes"] for m in modules.values())
    if tiers_from == "zeros" and packed_bytes >= dense_bytes:  # e.g. unstructured sparsity: a few blocks fit
        dense_f, nm_f, topk_f = _tier_fractions(maps)
        raise TierpruneError(f"packing {source} would not make it smaller ({packed_bytes / dense_bytes:.3f}x the "
                             f"dense bytes): its zeros leave {dense_f:.2%} of the {block_size}x{block_size} blocks "
                             f"dense (2:4 {nm_f:.2%}, topk {topk_f:.2%}); the hybrid format needs blocks pruned "
                             "2:4 or to TopK (`prune --pattern 2:4|block|tiers`)")
    dtype = str(next(iter(originals.values())).weight.dtype).removeprefix("torch.")
    layout = {"format": HYBRID_FORMAT, "block_size": block_size, "topk": topk, "dtype": dtype,
              "source": source, "iteration": done_iteration, "tiers_from": tiers_from,
              "packed_linear_bytes": packed_bytes,
              "dense_linear_bytes": dense_bytes, "dense_copy": dense, "modules": modules}

    save_pretrained_dir(model, tokenizer, output, weights=False)
    state = _dedup_state_dict(model)
    save_file(state, f"{output}/{PACKED_FILE}")
    save_file(layout, f"{output}/{LAYOUT_FILE}")
    if dense:
        for name, module in originals.items():  # the pruned dense linears back in place, for plain transformers
            _swap(model, name, module)
        save_pretrained_dir(model, tokenizer, output)
    file_bytes = sum(t.numel() * t.element_size() for t in state.values())
    return {"source": source, "output": output, "iteration": done_iteration, "modules": len(names),
            "block_size": block_size, "topk": topk, "dtype": dtype, "tiers_from": tiers_from,
            "tiers": _tier_fractions(maps), "packed_bytes": packed_bytes,
            "dense_bytes": dense_bytes, "model_file_bytes": file_bytes, "dense_copy": dense}


def _tier_fractions(maps: dict[str, torch.Tensor]) -> list[float]:
    """Fractions of all blocks in (Dense, 2:4, TopK)."""
    counts = sum(tier_counts(t) for t in maps.values())
    return [round(int(c) / max(int(counts.sum()), 1), 4) for c in counts]


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _read_folder(directory: str) -> tuple[object, dict, dict[str, torch.Tensor]]:
    """(config, hybrid.json, packed state dict) of a converted folder."""
    from transformers import AutoConfig

    directory = directory.rstrip("/")
    if not file_exists(f"{directory}/{LAYOUT_FILE}"):
        raise TierpruneError(f"{directory} is not a converted model folder (no {LAYOUT_FILE}; see `tierprune convert`)")
    layout = load_file(f"{directory}/{LAYOUT_FILE}")
    if layout.get("format") != HYBRID_FORMAT:
        raise TierpruneError(f"{directory}/{LAYOUT_FILE}: format {layout.get('format')!r}, expected {HYBRID_FORMAT}")
    return AutoConfig.from_pretrained(directory), layout, load_file(f"{directory}/{PACKED_FILE}")


def _empty_model(config, dtype: torch.dtype) -> nn.Module:
    """A model of `config` whose weights are about to be loaded: no random initialisation spent on them."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()  # from_config does not tie here; the config says which tensors are one
    # Tied tensors are stored once: a missing name is fine only if it shares its storage with a loaded one.
    params = dict(model.state_dict(keep_vars=True))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if params[k].data_ptr() not in loaded_ptrs]
    if unexpected or untied:
        raise TierpruneError(f"the packed file does not fit its config: missing {untied[:3]}, unexpected "
                             f"{unexpected[:3]}")
    return model


def load_hybrid(directory: str, device: str | torch.device = "cpu") -> nn.Module:
    """A transformers model with HybridLinear layers from a folder that `convert` wrote."""
    config, layout, state = _read_folder(directory)
    model = _empty_model(config, getattr(torch, layout["dtype"]))
    packed = prepare_hybrid_(model, state)
    if sorted(packed) != sorted(layout["modules"]):
        raise TierpruneError(f"{directory}: {PACKED_FILE} and {LAYOUT_FILE} name different packed modules")
    return _load_into(model, state).to(device)


def load_dense(directory: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """A plain transformers model (nn.Linear / Conv1D, zeros where pruned) from a folder that `convert` wrote,
    in `dtype` (default: the packed one)."""
    config, layout, state = _read_folder(directory)
    # Built in the dtype and loaded into (a cast of the values alone): model.to(dtype) would also cast buffers
    # that transformers keeps in fp32, such as the rotary frequencies.
    model = _empty_model(config, dtype or getattr(torch, layout["dtype"]))
    return _load_into(model, dense_state_dict(state)).to(device)
