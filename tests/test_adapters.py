"""Architecture adapters and the layer walk on a tiny random model of every supported family.

Each case checks that the adapter finds the decoder layers and exactly the expected linears, that
`weight_view` is (out, in) as the linear is really fed (GPT-2's Conv1D is stored transposed), that
walking the layers one at a time reproduces the model's own forward pass (so the captured masks,
rotary tables, alibi and positions are right, also for a smaller last batch), and that Wanda 2:4
prunes those linears and nothing else.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from tierprune.adapters import adapter_for, decoder_layers, prunable_linears, weight_view
from tierprune.config import PruneConfig
from tierprune.errors import TierpruneError
from tierprune.tasks.layerwise import walk_layers
from tierprune.tasks.prune import named_linears, prune_model_

pytestmark = pytest.mark.unit

HIDDEN, LAYERS, HEADS, VOCAB = 64, 2, 4, 128
N_SEQ, SEQLEN = 4, 16

LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED_QKV_LINEARS = ("self_attention.query_key_value", "self_attention.dense",
                     "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")  # BLOOM and Falcon


@dataclass(frozen=True)
class Arch:
    model_type: str
    family: str
    config: dict  # tiny transformers config, in that config class's own field names
    linears: tuple[str, ...]  # prunable linears of one decoder layer
    final_norm: str  # the module applied after the last decoder layer


_LLAMA_LIKE = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, num_key_value_heads=2, vocab_size=VOCAB)
_FALCON = dict(hidden_size=HIDDEN, ffn_hidden_size=128, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               vocab_size=VOCAB)

ARCHS = [
    Arch("llama", "llama", _LLAMA_LIKE, LLAMA_LINEARS, "model.norm"),
    Arch("mistral", "llama", _LLAMA_LIKE, LLAMA_LINEARS, "model.norm"),
    Arch("qwen2", "llama", _LLAMA_LIKE, LLAMA_LINEARS, "model.norm"),
    # Gemma's default head_dim is 256 whatever the hidden size.
    Arch("gemma", "llama", {**_LLAMA_LIKE, "head_dim": 16}, LLAMA_LINEARS, "model.norm"),
    # Phi-3's default pad token (32000) would fall outside the tiny vocabulary.
    Arch("phi3", "llama", {**_LLAMA_LIKE, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
         ("self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"), "model.norm"),
    Arch("opt", "opt",
         dict(hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              vocab_size=VOCAB, word_embed_proj_dim=HIDDEN, max_position_embeddings=64),
         ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"),
         "model.decoder.final_layer_norm"),
    Arch("gpt_neox", "gpt_neox",
         dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              vocab_size=VOCAB),
         ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
         "gpt_neox.final_layer_norm"),
    Arch("gpt2", "gpt2",
         dict(n_embd=HIDDEN, n_inner=128, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=64),
         ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), "transformer.ln_f"),
    Arch("bloom", "gpt2", dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB),
         FUSED_QKV_LINEARS, "transformer.ln_f"),
    Arch("falcon", "gpt2", _FALCON, FUSED_QKV_LINEARS, "transformer.ln_f"),  # Falcon-7B: multi-query, rotary
    Arch("gptj", "gpt2",
         dict(n_embd=HIDDEN, n_inner=128, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=64,
              rotary_dim=8),
         ("attn.k_proj", "attn.v_proj", "attn.q_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out"),
         "transformer.ln_f"),
]


# Layers the model calls with inputs of their own, which the walk must replay per layer: Gemma-2
# alternates sliding-window (8 < 16 tokens) and full-attention masks; Falcon with alibi folds the
# batch-sized alibi into the mask.
WALK_EXTRAS = {
    "gemma2-sliding": Arch("gemma2", "llama", {**_LLAMA_LIKE, "head_dim": 16, "sliding_window": 8},
                           LLAMA_LINEARS, "model.norm"),
    "falcon-alibi": Arch("falcon", "gpt2", {**_FALCON, "alibi": True}, FUSED_QKV_LINEARS,
                         "transformer.ln_f"),
}


def _build(arch: Arch, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch.model_type, **arch.config, use_cache=False)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (N_SEQ, SEQLEN), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=ARCHS, ids=[a.model_type for a in ARCHS])
def arch(request) -> Arch:
    return request.param


def test_adapter_finds_decoder_layers(arch: Arch):
    model = _build(arch)
    assert adapter_for(model).family == arch.family
    layers = decoder_layers(model)
    assert isinstance(layers, torch.nn.ModuleList)
    assert len(layers) == model.config.num_hidden_layers == LAYERS


def test_prunable_linears_and_weight_view(arch: Arch):
    model = _build(arch)
    layers = decoder_layers(model)
    fed: dict[str, tuple[int, int]] = {}  # full name -> (input features, output features) seen in forward
    hooks = []
    for i, layer in enumerate(layers):
        linears = prunable_linears(layer)
        assert sorted(linears) == sorted(arch.linears)
        for name, module in linears.items():
            def hook(module, args, output, key=f"{i}.{name}"):
                fed[key] = (args[0].shape[-1], output.shape[-1])
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(_ids())
    for h in hooks:
        h.remove()
    for i, layer in enumerate(layers):
        for name, module in prunable_linears(layer).items():
            W = weight_view(module)
            assert W.ndim == 2 and W.data_ptr() == module.weight.data_ptr()  # a view, not a copy
            assert tuple(W.shape) == (fed[f"{i}.{name}"][1], fed[f"{i}.{name}"][0]), name
            assert W.shape[1] % 8 == 0


@pytest.mark.parametrize("arch", ARCHS + list(WALK_EXTRAS.values()),
                         ids=[a.model_type for a in ARCHS] + list(WALK_EXTRAS))
def test_walk_layers_reproduces_forward(arch: Arch):
    batch_size = 3  # 4 sequences: batches of 3 and 1
    model = _build(arch)
    ids = _ids()
    # The input of the final norm is the last decoder layer's output; `hidden_states[-1]` would not
    # do: every architecture here returns it after the final norm.
    final_norm = model.get_submodule(arch.final_norm)
    expected = []
    handle = final_norm.register_forward_pre_hook(lambda m, args: expected.append(args[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()

    layers = decoder_layers(model)
    walked = []
    handle = layers[-1].register_forward_hook(
        lambda m, args, out: walked.append(out[0] if isinstance(out, tuple) else out))
    try:
        stats = walk_layers(model, ids, None, batch_size=batch_size)
    finally:
        handle.remove()

    assert set(stats) == set(named_linears(model))
    for name, s in stats.items():
        assert (s.n_samples, s.n_tokens) == (N_SEQ, N_SEQ * SEQLEN), name
        assert s.sq_norm.shape == (weight_view(model.get_submodule(name)).shape[1],)
        assert torch.isfinite(s.sq_norm).all() and (s.sq_norm > 0).any(), name
    assert [w.shape[0] for w in walked] == [3, 1]
    torch.testing.assert_close(torch.cat(walked), expected[0], atol=1e-5, rtol=1e-5)


def test_wanda_2_4_prunes_only_decoder_linears(arch: Arch):
    model = _build(arch)
    ids = _ids()
    dense = copy.deepcopy(model)
    prune_model_(model, PruneConfig(method="wanda", pattern="2:4"), ids, batch_size=2)

    pruned_weights = {f"{name}.weight" for name in named_linears(model)}
    assert len(pruned_weights) == LAYERS * len(arch.linears)
    dense_params = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        if name not in pruned_weights:  # embeddings, LM head, norms, biases
            assert torch.equal(p, dense_params[name]), name
    for name, module in named_linears(model).items():
        W = weight_view(module)
        zeros = (W == 0).reshape(W.shape[0], -1, 4).sum(-1)  # (out, in/4) zeros per group of 4 inputs
        assert (zeros == 2).all(), name
        assert torch.equal(W, weight_view(dense.get_submodule(name)) * (W != 0)), name  # survivors unchanged

    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (N_SEQ, SEQLEN, VOCAB)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("model_type, config", [
    ("bert", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)),
    ("t5", dict(d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64)),
])
def test_unknown_architecture_raises(model_type: str, config: dict):
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **config)
    model = AutoModel.from_config(config).eval()
    with pytest.raises(TierpruneError, match=model_type):
        adapter_for(model)
    with pytest.raises(TierpruneError, match=model_type):
        prune_model_(model, PruneConfig(method="wanda", pattern="2:4"), _ids())


# ------------------------------------------------------------------------- windows and learned positions

@pytest.fixture(scope="module")
def tiny_gpt2_dir(data_dir, tmp_path_factory):
    """A tiny GPT-2 with a learned table of 64 positions, saved with a tiny tokenizer."""
    import pandas as pd
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer(pd.read_parquet(data_dir / "c4-subset").text[:50].tolist())
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=len(tokenizer)))
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_only_learned_position_tables_limit_the_windows() -> None:
    from types import SimpleNamespace

    from transformers import GPT2Config, LlamaConfig, OPTConfig

    from tierprune.adapters import learned_positions

    assert learned_positions(SimpleNamespace(config=GPT2Config(n_positions=1024))) == (1024, "n_positions")
    assert learned_positions(SimpleNamespace(config=OPTConfig(max_position_embeddings=2048))) == (
        2048, "max_position_embeddings")
    assert learned_positions(SimpleNamespace(config=LlamaConfig(max_position_embeddings=8192))) is None  # rotary


def test_windows_longer_than_the_position_table_are_refused_before_any_work(tiny_gpt2_dir, data_dir, tmp_path):
    """GPT-2's 1024 positions against the protocol's 2048-token windows: one line, not an IndexError later."""
    from tierprune.config import config_from_flags
    from tierprune.tasks.oneshot import run_oneshot
    from tierprune.tasks.run_state import check_run_inputs

    data = {"calib": f"c4:{data_dir}/c4-subset", "eval": f"wikitext2:{data_dir}/wikitext-2-raw",
            "calib_samples": 2, "eval_max_windows": 1}
    with pytest.raises(TierpruneError, match=r"^--calib-seqlen 128 is longer than this gpt2 model's 64 learned "
                                             r"positions \(n_positions\); give --calib-seqlen 64 or less$"):
        run_oneshot(config_from_flags(model=str(tiny_gpt2_dir), calib_seqlen=128, eval_seqlen=32, **data))
    store = tmp_path / "store"
    with pytest.raises(TierpruneError, match=r"^--ft-seqlen 128 is longer"):
        check_run_inputs(config_from_flags(model=str(tiny_gpt2_dir), calib_seqlen=32, eval_seqlen=32,
                                           ft_seqlen=128, plan="smoke", store=str(store), run="r", **data))
    assert not store.exists()  # refused before the run exists, so the corrected command is not "another run"
    check_run_inputs(config_from_flags(model=str(tiny_gpt2_dir), calib_seqlen=32, eval_seqlen=64, ft_seqlen=64,
                                       plan="smoke", store=str(store), run="r", **data))  # at the limit: fine


def test_a_mistyped_model_path_fails_before_any_data_is_fetched(monkeypatch) -> None:
    """`prune --model ./typo` with the hub data defaults: the model's line, not a dataset's after its retries."""
    import tierprune.tasks.oneshot as oneshot
    from tierprune.config import config_from_flags

    def no_data(*args, **kwargs):
        raise AssertionError("data was fetched before the model path was checked")

    monkeypatch.setattr(oneshot, "load_texts", no_data)
    with pytest.raises(TierpruneError, match=r"^model directory not found: \./no-such-model$"):
        oneshot.run_oneshot(config_from_flags(model="./no-such-model", calib="c4", eval="wikitext2"))


def test_a_run_or_a_folder_without_config_given_as_model_says_what_it_is(tmp_path) -> None:
    """`evaluate STORE/RUN` (or --model) gets the command that writes the run's model, not transformers'
    "Unrecognized model ... model_type"; any other folder without config.json one plain line."""
    from tierprune.models import resolve_model

    run = tmp_path / "store" / "run-1"
    (run / "iter-003").mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    with pytest.raises(TierpruneError, match=rf"^{run} is a tierprune run, not a model folder: write its model with "
                                             rf"`tierprune runs export {run} --output DIR`"):
        resolve_model(str(run))
    with pytest.raises(TierpruneError, match=rf"^{run}/iter-003 is an iteration of a tierprune run, not a model "
                                             rf"folder: write its model with `tierprune runs export {run} "
                                             r"--iteration 3 --output DIR`"):
        resolve_model(str(run / "iter-003"))
    with pytest.raises(TierpruneError, match=rf"^{tmp_path}/store is not a model folder \(no config.json\)"):
        resolve_model(str(tmp_path / "store"))


def test_a_model_output_in_a_run_store_is_refused(tmp_path) -> None:
    """`convert RUN --output RUN` packed a model into the run's own folder, `runs export RUN --output STORE` into
    the store beside its runs: every model writer now refuses a run, a folder inside one, and a store."""
    from tierprune.models import refuse_other_model_in_folder

    run = tmp_path / "store" / "run-1"
    (run / "iter-003").mkdir(parents=True)
    (run / "RUN.json").write_text("{}")
    (run / "manifest.json").write_text("{}")
    for output, what in ((run, "is a tierprune run"), (run / "iter-003" / "model", f"lies inside {run}, which is a "
                                                                                 "tierprune run"),
                         (tmp_path / "store", r"is a run store \(it holds runs\)")):
        for dense, packed in ((True, False), (False, True)):
            with pytest.raises(TierpruneError, match=rf"^--output {output} {what}: a model written there would mix"):
                refuse_other_model_in_folder(str(output), dense=dense, packed=packed)
    refuse_other_model_in_folder(str(tmp_path / "store" / "exports"), dense=True, packed=False)  # beside runs: fine
    (tmp_path / "webapp").mkdir()
    (tmp_path / "webapp" / "manifest.json").write_text("{}")  # another tool's manifest is not a run
    refuse_other_model_in_folder(str(tmp_path / "webapp" / "model"), dense=True, packed=False)


def test_output_into_the_models_own_folder_is_refused_and_the_original_kept(tiny_gpt2_dir, tmp_path) -> None:
    """`prune --model ./m --output ./m` would replace the dense original with the pruned copy."""
    import shutil

    from tierprune.config import config_from_flags
    from tierprune.tasks.oneshot import run_oneshot

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, model_dir)
    original = (model_dir / "model.safetensors").read_bytes()
    (tmp_path / "link").symlink_to(model_dir)
    cfg = config_from_flags(model=str(model_dir), method="magnitude", pattern="2:4", eval="none")
    for spelling in (str(model_dir), f"{model_dir}/.", str(tmp_path / "link")):
        with pytest.raises(TierpruneError, match=r"^--output .* is the folder --model .* is loaded from: writing "
                                                 r"there would replace the original model; give another folder$"):
            run_oneshot(cfg, output=spelling)
    assert (model_dir / "model.safetensors").read_bytes() == original
    run_oneshot(cfg, output=str(tmp_path / "pruned"))  # another folder: written
    assert (tmp_path / "pruned" / "model.safetensors").read_bytes() != original


def test_output_holding_a_packed_model_is_refused_before_pruning(tiny_gpt2_dir, tmp_path) -> None:
    """prune --output into a `convert` folder: the new dense weights would sit beside a packed layout that
    load_hybrid still loads. Refused in one line, the folder as it was; an export-like folder is rewritten."""
    from tierprune.config import config_from_flags
    from tierprune.tasks.oneshot import run_oneshot

    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "hybrid.json").write_text("{}")
    cfg = config_from_flags(model=str(tiny_gpt2_dir), method="magnitude", pattern="2:4", eval="none")
    with pytest.raises(TierpruneError, match=r"^--output .*packed holds a packed model \(hybrid.json\) that this "
                                             r"command would not replace, and load_hybrid would still load it; "
                                             r"give another folder$"):
        run_oneshot(cfg, output=str(packed))
    assert sorted(p.name for p in packed.iterdir()) == ["hybrid.json"]
    run_oneshot(cfg, output=str(tmp_path / "pruned"))
    run_oneshot(cfg, output=str(tmp_path / "pruned"))  # a dense folder rewritten by the same kind: fine
    assert (tmp_path / "pruned" / "model.safetensors").is_file()


@pytest.mark.parametrize("root", ["local", "memory"])
def test_which_existing_model_files_each_kind_of_output_refuses(root, tmp_path, mem_root) -> None:
    """Dense writers (prune, runs export) refuse a packed layout; packed-only writers (convert) refuse dense
    weights; convert --dense rewrites both kinds and refuses neither. On any fsspec store."""
    from tierprune.models import refuse_other_model_in_folder
    from tierprune.storage.tables import save_file

    base = str(tmp_path) if root == "local" else mem_root
    for name in ("hybrid.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        folder = f"{base}/{name}-folder"
        save_file(b"x", f"{folder}/{name}")
        save_file(b"x", f"{folder}/tokenizer.json")  # a tokenizer is rewritten by every kind
        dense_refused, packed_refused = name == "hybrid.json", name != "hybrid.json"
        for dense, packed, refused in ((True, False, dense_refused), (False, True, packed_refused),
                                       (True, True, False)):
            if refused:
                with pytest.raises(TierpruneError, match=f"holds .*{name.replace('.', '[.]')}"):
                    refuse_other_model_in_folder(folder, dense=dense, packed=packed)
            else:
                refuse_other_model_in_folder(folder, dense=dense, packed=packed)
    refuse_other_model_in_folder(f"{base}/missing", dense=False, packed=True)  # a new folder: nothing to refuse
    refuse_other_model_in_folder(None, dense=True, packed=False)
