"""Shared fixtures: the shared data folder and tiny randomly initialised causal LMs."""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec

import pytest
import torch

from .benchmark_loader import BENCHMARKS, load_benchmark  # noqa: F401  (the benchmarks' tests import them here)

DATA = Path(os.environ.get("TIERPRUNE_DATA", Path(__file__).parents[1] / ".." / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip(f"shared data not found in {DATA} (set TIERPRUNE_DATA)")
    return DATA


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2, hidden: int = 64,
                    intermediate: int = 128, vocab: int = 128):
    """A randomly initialised LLaMA small enough for exact comparisons on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True, use_cache=False)
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def mem_root() -> Iterator[str]:
    """A fresh memory:// folder, removed afterwards (the memory filesystem is process-global)."""
    root = f"memory://tierprune-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


S3_BUCKET = "tierprune-test"


@pytest.fixture(scope="session")
def s3_base() -> Iterator[str]:
    """s3://tierprune-test on a moto server on 127.0.0.1 for the whole session; plain s3:// URIs reach it.

    fsspec applies fsspec.config.conf["s3"] to every S3FileSystem it makes, so RunStore("s3://…", …) needs no
    storage options; s3fs's instance cache is cleared so that no filesystem made before keeps other settings.
    """
    import logging

    import boto3
    import fsspec.config
    import s3fs
    from moto import server as moto_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **credentials).create_bucket(Bucket=S3_BUCKET)

    saved = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield f"s3://{S3_BUCKET}"
    finally:
        if saved is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()




def make_tiny_tokenizer(texts: list[str]):
    """A byte-level BPE of 320 tokens trained on a few documents, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_llama_dir(data_dir: Path, tmp_path_factory) -> Path:
    """A tiny LLaMA (hidden 64, MLP 128, 2 layers) saved with a tiny tokenizer, loadable by path."""
    import pandas as pd

    texts = pd.read_parquet(data_dir / "c4-subset").text[:100].tolist()
    tokenizer = make_tiny_tokenizer(texts)
    model = make_tiny_llama(vocab=len(tokenizer))
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect API for the whole session (a SQLite database in a temp folder)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


_MIGRATED_DATABASE: list[Path] = []
_MIGRATED_DATABASE_LOCK = threading.Lock()


def prefect_home(folder: Path) -> str:
    """`folder` as a PREFECT_HOME for a CLI subprocess (returned as the string its environment takes), holding a
    copy of a Prefect database that already has every migration applied.

    Why: a `tierprune run` in a new PREFECT_HOME spends about 6 s creating and migrating its SQLite database
    before its first flow (Prefect 3.8 on this 2-core machine: 12 s to the first flow, 6 s with a migrated
    database), and the suite's subprocess tests start many such runs. The copy is made once per session with
    `prefect server database upgrade`; each run still starts its own ephemeral server on its own database, as a
    user's second run does.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "prefect.db").exists():
        shutil.copyfile(_migrated_database(), folder / "prefect.db")
    return str(folder)


def _migrated_database() -> Path:
    with _MIGRATED_DATABASE_LOCK:  # the crash-safety runs start from several threads at once
        if not _MIGRATED_DATABASE:
            home = Path(tempfile.mkdtemp(prefix="tierprune-prefect-home-"))
            atexit.register(shutil.rmtree, home, ignore_errors=True)
            env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
            env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
            # cwd: outside the project, whose prefect.toml names another home
            subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], cwd=home,
                           env=env, check=True, capture_output=True, timeout=300)
            assert (home / "prefect.db").is_file(), f"prefect made no database in {home}"
            _MIGRATED_DATABASE.append(home / "prefect.db")
        return _MIGRATED_DATABASE[0]


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, except that tests/live's files go to one worker together: they share one session fixture
    (a Prefect server and `tierprune serve`, about a minute of CPU), which two workers would each start."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LiveTestsTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "tests/live" if nodeid.startswith("tests/live/") else super()._split_scope(nodeid)

    return LiveTestsTogether(config, log)
