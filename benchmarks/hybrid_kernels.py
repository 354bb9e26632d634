"""GPU benchmark of the hybrid Dense / 2:4 / TopK kernels against cuBLAS, torch 2:4 and torch BSR.

1. Per matrix: LLaMA-2-7B shapes x tokens (1, 16, 128, 2048) x tier mixes (90/10/0, 35/45/20, k=10) x
   placement (random, clustered). Each method is timed by replaying a CUDA graph of `--inner` calls that
   cycle through several copies of the weights (more bytes than the L2 holds, so every call reads its
   weight from HBM), `--reps` replays timed with CUDA events; medians. Ratios are cuBLAS time / method
   time (> 1 is faster than cuBLAS). `hybrid_default` is the op as users get it: 1-16 tokens through the
   CUDA row kernel (kernels/cuda) where its CTAs fit the GPU at once (else one token through the flat GEMV),
   up to 128 tokens the streaming Triton kernel, beyond that unpack + cuBLAS. Unless --no-tune, the
   streaming kernel is also tuned per case over (NB, SPLIT, warps, token tile), at 1 token against the GEMV
   kernel (no tensor cores), at 128 tokens against unpack + cuBLAS; `hybrid` is the best of all of these.
2. End to end: greedy decode, batch 1, of a randomly initialised LLaMA-2-7B-shaped model (a minimal
   LLaMA written here: fused QKV and gate-up linears, RoPE, static KV cache; not transformers' model, so
   that one decode step captures into one CUDA graph), dense vs hybrid at 35/45/20: tokens/s and peak memory.
   The dense model is the pruned one (masks applied), so the two runs compute the same function.
   --compile also times both with torch.compile on each layer or on the whole step (gpt-fast's setting).

Prints a table, then one JSON object per line (lines starting with '{'). Run:
    python benchmarks/hybrid_kernels.py                  # an H100/H200; about 3-4 minutes
    python benchmarks/hybrid_kernels.py --tiny           # a CPU dry run of the logic (tiny shapes, no timing value)
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tierprune.kernels.hybrid import HybridWeight, ideal_nbytes, pack_hybrid
from tierprune.kernels.masks import nm_mask
from tierprune.kernels.tiers import DENSE, NM_2_4, TOPK, target_counts, tier_keep_mask
from tierprune.kernels.triton.hybrid_mm import (
    DECODE_MAX_TOKENS,
    SKINNY_MAX_TOKENS,
    decode_config,
    hybrid_mm,
    hybrid_mm_decode,
    hybrid_mm_prefill,
    hybrid_unpack,
    set_decode_config,
)

BS, TOPK_K = 16, 10
SHAPES = {  # (out, in)
    "qkvo 4096x4096": (4096, 4096),
    "up 11008x4096": (11008, 4096),
    "down 4096x11008": (4096, 11008),
    "fused-qkv 12288x4096": (12288, 4096),
    "fused-gate-up 22016x4096": (22016, 4096),
}
TINY_SHAPES = {"tiny 64x96": (64, 96), "tiny 48x208": (48, 208)}
MIXES = {"90/10/0": (0.90, 0.10, 0.0), "35/45/20": (0.35, 0.45, 0.20)}
PLACEMENTS = ("random", "clustered")
E2E_MIX = ("35/45/20", "random")  # the end-to-end model's tiers; its decode configs come from these rows
# (NB, SPLIT, num_warps, token tile, prefetch): see tierprune.kernels.triton.hybrid_mm.decode_config
DECODE_CONFIGS = [(nb, split, 4, 16, prefetch) for nb in (4, 8) for split in (2, 4, 8) for prefetch in (False, True)]
GEMV_CONFIGS = [(nb, split, 4, 1, prefetch) for nb in (4, 8, 16) for split in (2, 4, 8)  # one token, no tensor cores
                for prefetch in (False, True)]
SKINNY_CONFIGS = [(nb, split, 4, tile, False) for tile in (32, 64) for nb in (2, 4, 8) for split in (1, 2, 4)]


# ---------------------------------------------------------------- weights


def make_tier_map(shape: tuple[int, int], mix: tuple[float, float, float], placement: str,
                  g: torch.Generator) -> torch.Tensor:
    """Exact tier counts for `mix`; random: blocks shuffled, clustered: a smooth field ranks them."""
    nbr, nbc = -(-shape[0] // BS), -(-shape[1] // BS)
    n = nbr * nbc
    n_dense, n_nm, n_topk = target_counts(n, mix)
    if placement == "random":
        score = torch.rand(n, generator=g)
    else:  # patches of 8x8 blocks share a score: contiguous regions of one tier
        coarse = torch.rand(-(-nbr // 8), -(-nbc // 8), generator=g)
        field = coarse.repeat_interleave(8, 0).repeat_interleave(8, 1)[:nbr, :nbc]
        score = (field + 1e-3 * torch.rand(nbr, nbc, generator=g)).flatten()
    order = torch.argsort(score)  # lowest scores are demoted furthest
    tiers = torch.full((n,), DENSE, dtype=torch.int8)
    tiers[order[:n_topk]] = TOPK
    tiers[order[n_topk:n_topk + n_nm]] = NM_2_4
    return tiers.view(nbr, nbc)


def pruned_weight(shape: tuple[int, int], tier_map: torch.Tensor, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    W = (torch.randn(shape, generator=g, device=device) * 0.02).to(torch.bfloat16)
    return W * tier_keep_mask(W.float().abs(), tier_map.to(device), BS, TOPK_K)


def copies_needed(nbytes: int, device: str) -> int:
    """Copies of a weight so that cycling through them overflows the L2 (>= 2x its size)."""
    if not device.startswith("cuda"):
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(2, min(8, math.ceil(2 * l2 / max(nbytes, 1)) + 1))


def clone_hybrid(hw: HybridWeight) -> HybridWeight:
    return HybridWeight(hw.shape, hw.block_size, hw.topk, **{k: v.clone() for k, v in hw.tensors().items()})


# ---------------------------------------------------------------- timing


def measure_us(fns: list[Callable[[], object]], device: str, inner: int, reps: int) -> tuple[float, str]:
    """Median microseconds per call; a CUDA graph of `inner` calls cycling `fns`, else eager events."""
    if not device.startswith("cuda"):
        for f in fns:
            f()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for i in range(inner):
                fns[i % len(fns)]()
            times.append((time.perf_counter() - t0) / inner * 1e6)
        return statistics.median(times), "cpu"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: compiles, cuBLAS handles, workspaces
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(inner):
                fns[i % len(fns)]()
        run, mode = graph.replay, "graph"
    except Exception as e:  # some library paths refuse capture: time them eagerly and say so
        torch.cuda.synchronize()
        print(f"  (graph capture failed: {type(e).__name__}: {str(e)[:120]}; timing eagerly)")

        def run() -> None:
            for i in range(inner):
                fns[i % len(fns)]()
        mode = "eager"
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    return statistics.median(times), mode


def try_measure(name: str, make_fns: Callable[[], list[Callable[[], object]]], device: str, inner: int,
                reps: int) -> tuple[float | None, str]:
    try:
        return measure_us(make_fns(), device, inner, reps)
    except Exception as e:
        print(f"  {name}: unavailable ({type(e).__name__}: {str(e)[:160]})")
        return None, "n/a"


# ---------------------------------------------------------------- baselines


def sparse_24_fns(shape, x, device, seed) -> list[Callable[[], object]]:
    """torch's 2:4 (cuSPARSELt / CUTLASS) on a fully 2:4 weight of the same shape."""
    from torch.sparse import to_sparse_semi_structured

    g = torch.Generator(device=device).manual_seed(seed)
    W = (torch.randn(shape, generator=g, device=device) * 0.02).to(torch.bfloat16)
    W = W * nm_mask(W.float().abs(), 2, 4)
    n = copies_needed(W.numel(), device)
    weights = [to_sparse_semi_structured(W.clone()) for _ in range(n)]
    return [lambda w=w: F.linear(x, w) for w in weights]


def bsr_fns(W: torch.Tensor, x, device) -> list[Callable[[], object]]:
    """torch BSR with 16x16 blocks (every block of a hybrid weight holds non-zeros, so all are stored)."""
    n = copies_needed(W.numel() * 2, device)
    weights = [W.to_sparse_bsr((BS, BS)) for _ in range(n)]
    try:
        F.linear(x, weights[0])
        return [lambda w=w: F.linear(x, w) for w in weights]
    except (RuntimeError, NotImplementedError, TypeError):
        return [lambda w=w: (w @ x.t()).t() for w in weights]


# ---------------------------------------------------------------- kernel table


def bench_kernels(args, device: str, t0: float) -> list[dict]:
    shapes = TINY_SHAPES if args.tiny else {
        name: shape for name, shape in SHAPES.items() if not args.shapes or name.split()[0] in args.shapes}
    tokens_list = args.tokens
    rows = []
    for shape_name, shape in shapes.items():
        xs = {T: (torch.randn(T, shape[1], device=device) * 0.5).to(torch.bfloat16) for T in tokens_list}
        dense_weights = None
        base: dict[tuple[str, int], tuple[float | None, str]] = {}
        for mix_name, mix in MIXES.items():
            for placement in PLACEMENTS:
                if time.perf_counter() - t0 > args.table_budget_s:
                    print(f"  time budget reached: skipping {shape_name} {mix_name} {placement}")
                    continue
                g = torch.Generator().manual_seed(zlib.crc32(f"{shape} {mix_name} {placement}".encode()))
                tier_map = make_tier_map(shape, mix, placement, g)
                W = pruned_weight(shape, tier_map, device, seed=1)
                hw = pack_hybrid(W, tier_map.to(device), block_size=BS, topk=TOPK_K)
                assert torch.equal(hw.to_dense(), W)
                counts = hw.tier_counts()
                ideal = ideal_nbytes(counts, BS, TOPK_K, 2)
                n = copies_needed(hw.nbytes, device)
                hws = [hw] + [clone_hybrid(hw) for _ in range(n - 1)]
                if dense_weights is None:  # cuBLAS and BSR timings depend on the shape only
                    nd = copies_needed(W.numel() * 2, device)
                    dense_weights = [W.clone() for _ in range(nd)]
                for T in tokens_list:
                    x = xs[T]
                    if ("cublas", T) not in base:
                        base[("cublas", T)] = measure_us([lambda w=w: F.linear(x, w) for w in dense_weights],
                                                         device, args.inner, args.reps)
                        if device.startswith("cuda"):
                            base[("2:4", T)] = try_measure("torch 2:4", lambda: sparse_24_fns(shape, x, device, 2),
                                                           device, args.inner, args.reps)
                            base[("bsr", T)] = try_measure("torch BSR", lambda: bsr_fns(W, x, device),
                                                           device, args.inner, args.reps)
                    dense_us = base[("cublas", T)][0]
                    hybrid_us, mode = measure_us([lambda h=h: hybrid_mm(x, h) for h in hws], device,
                                                 args.inner, args.reps)
                    row = dict(kind="kernel", shape=shape_name, out=shape[0], inp=shape[1], tokens=T, mix=mix_name,
                               placement=placement, blocks=list(counts), nbytes=hw.nbytes, ideal_nbytes=ideal,
                               dense_nbytes=W.numel() * 2, bytes_vs_ideal=hw.nbytes / ideal,
                               bytes_vs_dense=hw.nbytes / (W.numel() * 2), copies=n, timing=mode,
                               cublas_us=dense_us, hybrid_default_us=hybrid_us)
                    if T <= SKINNY_MAX_TOKENS and device.startswith("cuda") and not args.no_tune:
                        row.update(tune_decode(hws, x, device, args))
                        hybrid_us = min(hybrid_us, row.get("hybrid_best_us", hybrid_us))
                    if T > DECODE_MAX_TOKENS and device.startswith("cuda"):
                        row["unpack_us"], _ = measure_us([lambda h=h: hybrid_unpack(h) for h in hws], device,
                                                         args.inner, args.reps)
                    row["hybrid_us"] = hybrid_us
                    for key in ("2:4", "bsr"):
                        us = base.get((key, T), (None, "n/a"))[0]
                        row[f"torch_{key.replace(':', '')}_us"] = us
                    for key in ("hybrid", "hybrid_default", "torch_24", "torch_bsr"):
                        us = row.get(f"{key}_us")
                        row[f"{key}_vs_cublas"] = (dense_us / us) if us else None
                    rows.append(row)
                    print_row(row)
                del hws, hw
            gc.collect()
        del dense_weights, xs
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def tune_decode(hws: list[HybridWeight], x: torch.Tensor, device: str, args) -> dict:
    """Time the streaming kernel over its configs (and, above 16 tokens, unpack + cuBLAS); the best wins.

    A config is (NB, SPLIT, num_warps, token tile, prefetch); token tile 0 stands for unpack + cuBLAS.
    """
    T = x.shape[0]
    if T == 1:
        configs = GEMV_CONFIGS + [c for c in DECODE_CONFIGS if c[0] <= 8]
    else:
        configs = DECODE_CONFIGS if T <= DECODE_MAX_TOKENS else SKINNY_CONFIGS + [(0, 0, 0, 0, False)]
    best = None
    for config in configs:
        nb, split, warps, tile, prefetch = config
        if tile:
            make = lambda: [lambda h=h: hybrid_mm_decode(x, h, nb=nb, split=split, num_warps=warps, token_tile=tile,
                                                         prefetch=prefetch) for h in hws]
        else:
            make = lambda: [lambda h=h: hybrid_mm_prefill(x, h) for h in hws]
        us, _ = try_measure(f"config {config}", make, device, args.inner, args.reps)
        if us is not None and (best is None or us < best[0]):
            best = (us, config)
    if best is None:
        return {}
    return {"hybrid_best_us": best[0], "decode_config": list(best[1]),
            "default_config": list(decode_config(hws[0], T))}


HEADER = (f"{'shape':26} {'tok':>5} {'mix':>8} {'place':>9} {'bytes/ideal':>11} {'bytes/dense':>11} "
          f"{'cuBLAS us':>10} {'hybrid us':>10} {'x cuBLAS':>8} {'2:4 x':>6} {'BSR x':>6}")


def _fmt(v: float | None, width: int) -> str:
    return f"{v:{width}.2f}" if v is not None else "n/a".rjust(width)


def print_row(row: dict) -> None:
    print(f"{row['shape']:26} {row['tokens']:>5} {row['mix']:>8} {row['placement']:>9} "
          f"{row['bytes_vs_ideal']:>11.3f} {row['bytes_vs_dense']:>11.3f} {row['cublas_us']:>10.1f} "
          f"{row['hybrid_us']:>10.1f} {_fmt(row['hybrid_vs_cublas'], 8)} "
          f"{_fmt(row['torch_24_vs_cublas'], 6)} {_fmt(row['torch_bsr_vs_cublas'], 6)}", flush=True)


# ---------------------------------------------------------------- end to end


class RMSNorm(nn.Module):
    def __init__(self, dim: int, device, dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        hf = h.float()
        return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(h.dtype) * self.weight


class Block(nn.Module):
    """One LLaMA decoder layer for batch-1 decode with a static KV cache."""

    def __init__(self, hidden: int, inter: int, heads: int, max_len: int, device, dtype) -> None:
        super().__init__()
        self.heads, self.hd = heads, hidden // heads
        kw = dict(bias=False, device=device, dtype=dtype)
        self.qkv = nn.Linear(hidden, 3 * hidden, **kw)
        self.o = nn.Linear(hidden, hidden, **kw)
        self.gate_up = nn.Linear(hidden, 2 * inter, **kw)
        self.down = nn.Linear(inter, hidden, **kw)
        self.norm1, self.norm2 = RMSNorm(hidden, device, dtype), RMSNorm(hidden, device, dtype)
        self.register_buffer("k_cache", torch.zeros(1, heads, max_len, self.hd, device=device, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(1, heads, max_len, self.hd, device=device, dtype=dtype))

    def forward(self, h, pos, cos, sin, mask):  # h (1, 1, C); pos (1,) long; cos/sin (1, 1, 1, hd); mask (L,)
        q, k, v = self.qkv(self.norm1(h)).view(1, 1, 3, self.heads, self.hd).unbind(2)  # (1, 1, nh, hd) each
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (1, nh, 1, hd)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        att = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)  # (1, nh, 1, hd)
        h = h + self.o(att.transpose(1, 2).reshape(1, 1, -1))
        gate, up = self.gate_up(self.norm2(h)).chunk(2, dim=-1)
        return h + self.down(F.silu(gate) * up)


def rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class TinyLlama(nn.Module):
    def __init__(self, layers: int, hidden: int, inter: int, heads: int, vocab: int, max_len: int, device,
                 dtype) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden, device=device, dtype=dtype)
        self.blocks = nn.ModuleList(Block(hidden, inter, heads, max_len, device, dtype) for _ in range(layers))
        self.norm = RMSNorm(hidden, device, dtype)
        self.lm_head = nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype)
        hd = hidden // heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd // 2, device=device).float() / (hd // 2)))
        ang = torch.arange(max_len, device=device).float()[:, None] * inv[None, :]  # (L, hd/2)
        self.register_buffer("cos", ang.cos().to(dtype))
        self.register_buffer("sin", ang.sin().to(dtype))
        self.register_buffer("positions", torch.arange(max_len, device=device))

    def step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One greedy decode step in place: token (1, 1) <- argmax of the next-token logits; pos += 1."""
        h = self.embed(token)  # (1, 1, C)
        cos = self.cos.index_select(0, pos).view(1, 1, 1, -1)
        sin = self.sin.index_select(0, pos).view(1, 1, 1, -1)
        mask = (self.positions <= pos).view(1, 1, 1, -1)
        for block in self.blocks:
            h = block(h, pos, cos, sin, mask)
        logits = self.lm_head(self.norm(h))  # (1, 1, V)
        token.copy_(logits.argmax(-1))
        pos.add_(1)
        return logits


def decode_speed(model: TinyLlama, steps: int, device: str, use_graph: bool, rounds: int = 5) -> dict:
    """Tokens/s of greedy decode from position 0 (the median of `rounds` timed rounds of `steps` steps) and
    the peak memory during it."""
    for block in model.blocks:
        block.k_cache.zero_()
        block.v_cache.zero_()
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        first_logits = model.step(token, pos).float().clone()
        for _ in range(2):
            model.step(token, pos)
        run, mode = (lambda: model.step(token, pos)), "eager"
        if cuda and use_graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                model.step(token, pos)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model.step(token, pos)
            run, mode = graph.replay, "graph"
        run()
        elapsed = []
        for _ in range(rounds):  # each round decodes from position 0 again: the same work, timed again
            pos.zero_()
            token.zero_()
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                run()
            if cuda:
                torch.cuda.synchronize()
            elapsed.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    median = statistics.median(elapsed)
    return {"tokens_per_s": steps / median, "ms_per_token": median / steps * 1e3, "peak_bytes": peak,
            "mode": mode, "first_logits": first_logits, "rounds": rounds,
            "tokens_per_s_range": (steps / max(elapsed), steps / min(elapsed))}


COMPILE_SCOPES = ("layers", "step")


def compile_model(model: TinyLlama, scope: str | None) -> None:
    """torch.compile the model's decoder layers ("layers") or its whole decode step ("step"); None: eager.

    Inductor fuses the norms, RoPE, cache writes, residual adds and SwiGLU into a few kernels, while the
    linears stay cuBLAS (dense) or the hybrid op (a torch.library op, opaque to inductor). "layers": all
    layers share one compiled graph (their modules differ only in their tensors). "step" is gpt-fast's
    setting: one graph of every layer, so each layer's last residual add also fuses into the next one's norm.
    """
    torch._dynamo.reset()
    model.__dict__.pop("step", None)
    for block in model.blocks:
        block.__dict__.pop("forward", None)
    if scope == "layers":
        layer = torch.compile(Block.forward, fullgraph=True)
        for block in model.blocks:
            block.forward = layer.__get__(block)
    elif scope == "step":
        model.step = torch.compile(TinyLlama.step, fullgraph=True).__get__(model)
    elif scope is not None:
        raise ValueError(f"compile scope {scope!r}: expected one of {COMPILE_SCOPES}")


def decode_speed_compiled(model: TinyLlama, scope: str, steps: int, device: str, use_graph: bool) -> dict:
    compile_model(model, scope)
    try:
        return decode_speed(model, steps, device, use_graph)
    finally:
        compile_model(model, None)


def bench_end_to_end(args, device: str) -> list[dict]:
    from tierprune.hybrid_linear import HybridLinear

    if args.tiny:
        dims = dict(layers=2, hidden=64, inter=128, heads=4, vocab=128)
    else:
        dims = dict(layers=args.layers, hidden=4096, inter=11008, heads=32, vocab=32000)
    max_len = args.steps + 8
    torch.manual_seed(0)
    model = TinyLlama(**dims, max_len=max_len, device=device, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    tier_maps = {}
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
        for i, block in enumerate(model.blocks):  # prune: the dense run computes what the hybrid one does
            for name in ("qkv", "o", "gate_up", "down"):
                W = getattr(block, name).weight
                tier_maps[(i, name)] = make_tier_map(tuple(W.shape), MIXES[E2E_MIX[0]], E2E_MIX[1], g)
                W.mul_(tier_keep_mask(W.float().abs(), tier_maps[(i, name)].to(device), BS, TOPK_K))
    linear_bytes = sum(getattr(b, n).weight.numel() * 2 for b in model.blocks for n in ("qkv", "o", "gate_up", "down"))
    dense = decode_speed(model, args.steps, device, use_graph=not args.no_graph)
    scopes = getattr(args, "compile", None) or []
    compiled = {("dense", scope): decode_speed_compiled(model, scope, args.steps, device, not args.no_graph)
                for scope in scopes}
    with torch.no_grad():
        for (i, name), tier_map in tier_maps.items():
            block = model.blocks[i]
            setattr(block, name, HybridLinear.from_linear(getattr(block, name), tier_map.to(device),
                                                          block_size=BS, topk=TOPK_K))
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    hybrid_bytes = sum(getattr(b, n).nbytes for b in model.blocks for n in ("qkv", "o", "gate_up", "down"))
    # The op's one-token dispatch to the flat GEMV off (the row kernel takes one token then), then on (the
    # default where most blocks are 2:4 and TopK): what each is worth, side by side.
    from tierprune.kernels.cuda.mma_decode import use_rows_decode
    from tierprune.kernels.triton.flat_gemv import use_flat_gemv

    use_flat_gemv(False)
    try:
        hybrid = decode_speed(model, args.steps, device, use_graph=not args.no_graph)
        use_rows_decode(False)  # and the row kernel off too: the chunk kernel, the design before it
        chunk = decode_speed(model, args.steps, device, use_graph=not args.no_graph)
    finally:
        use_flat_gemv(True)
        use_rows_decode(True)
    flat = decode_speed(model, args.steps, device, use_graph=not args.no_graph)
    # Other flat GEMV configs (decode_sweep.py --e2e-flat-alternatives), each timed in the same run.
    from tierprune.kernels.triton.flat_gemv import set_flat_gemv_config

    alternatives = [("hybrid-chunk", chunk)]
    for cfg in getattr(args, "flat_alternatives", ()):
        previous = set_flat_gemv_config(cfg)
        try:
            alternatives.append((f"hybrid-flat {tuple(cfg)}",
                                 decode_speed(model, args.steps, device, use_graph=not args.no_graph)))
        finally:
            set_flat_gemv_config(previous)
    for scope in scopes:
        compiled["hybrid", scope] = decode_speed_compiled(model, scope, args.steps, device, not args.no_graph)
    err = (hybrid["first_logits"] - dense["first_logits"]).abs().max().item()
    scale = dense["first_logits"].abs().max().item()
    rows = []
    for name, res, nbytes in (("dense", dense, linear_bytes), ("hybrid", hybrid, hybrid_bytes),
                              ("hybrid-flat", flat, hybrid_bytes), *((n, r, hybrid_bytes) for n, r in alternatives),
                              *((f"{kind}, {scope} compiled", res, linear_bytes if kind == "dense" else hybrid_bytes)
                                for (kind, scope), res in compiled.items())):
        rows.append(dict(kind="e2e", model=name, **dims, steps=args.steps, mix="35/45/20", mode=res["mode"],
                         tokens_per_s=res["tokens_per_s"], tokens_per_s_range=res["tokens_per_s_range"],
                         rounds=res["rounds"], ms_per_token=res["ms_per_token"],
                         peak_gib=res["peak_bytes"] / 2**30 if res["peak_bytes"] else None,
                         linear_weight_gib=nbytes / 2**30))
    rows[1]["speedup_vs_dense"] = hybrid["tokens_per_s"] / dense["tokens_per_s"]
    rows[1]["first_logits_max_abs_diff"] = err
    rows[1]["first_logits_max_abs"] = scale
    for row, res in zip(rows[2:], (flat, *(r for _, r in alternatives), *compiled.values())):
        row["speedup_vs_dense"] = res["tokens_per_s"] / dense["tokens_per_s"]
        row["first_logits_max_abs_diff"] = (res["first_logits"] - dense["first_logits"]).abs().max().item()
    by_model = {r["model"]: r for r in rows}
    for scope in scopes:  # compiled against compiled the same way: gpt-fast's setting on both sides
        by_model[f"hybrid, {scope} compiled"]["speedup_vs_dense_compiled"] = (
            compiled["hybrid", scope]["tokens_per_s"] / compiled["dense", scope]["tokens_per_s"])
    print(f"\nend to end, {dims['layers']} layers, batch 1, {args.steps} greedy steps per round (median of "
          f"{dense['rounds']} rounds), CUDA graph: {dense['mode']}")
    for r in rows:
        peak = f"{r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else "n/a"
        low, high = r["tokens_per_s_range"]
        print(f"  {r['model']:34} {r['tokens_per_s']:9.1f} tokens/s ({low:.1f}-{high:.1f} over {r['rounds']} rounds)  "
              f"{r['ms_per_token']:7.3f} ms/token  "
              f"peak {peak}  linear weights {r['linear_weight_gib']:.2f} GiB")
    print(f"  hybrid (row kernel) / dense tokens/s: {rows[1]['speedup_vs_dense']:.3f} (with the flat GEMV "
          f"{rows[2]['speedup_vs_dense']:.3f}); first-step logits max |diff| "
          f"{err:.3g} (max |logit| {scale:.3g})")
    for r in rows[3:]:
        print(f"  {r['model']} / dense: {r['speedup_vs_dense']:.3f}, logits max |diff| "
              f"{r['first_logits_max_abs_diff']:.3g}")
    for r in rows:
        if "speedup_vs_dense_compiled" in r:
            print(f"  {r['model']} / dense compiled the same way: {r['speedup_vs_dense_compiled']:.3f}")
    return rows


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes and model: a dry run of the logic (CPU is fine)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--shapes", nargs="*", default=None, help="subset by first word, e.g. qkvo down")
    p.add_argument("--tokens", type=int, nargs="*", default=None)
    p.add_argument("--inner", type=int, default=20, help="calls per CUDA graph")
    p.add_argument("--reps", type=int, default=15, help="timed replays; the median is reported")
    p.add_argument("--no-tune", action="store_true", help="skip the decode config sweep")
    p.add_argument("--table-budget-s", type=float, default=200.0, help="skip table cases after this many seconds")
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument("--layers", type=int, default=32, help="end-to-end model depth (32 = LLaMA-2-7B)")
    p.add_argument("--steps", type=int, default=128, help="end-to-end decode steps")
    p.add_argument("--no-graph", action="store_true", help="end to end without a CUDA graph")
    p.add_argument("--compile", nargs="*", choices=COMPILE_SCOPES, default=None,
                   help="end to end also torch.compile'd, dense and hybrid: the decoder layers and/or the whole decode "
                        "step (gpt-fast's setting); no value: step")
    args = p.parse_args(argv)
    if args.compile == []:
        args.compile = ["step"]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tokens is None:
        args.tokens = [1, 4, 32] if args.tiny else [1, 16, 128, 2048]
    if args.tiny:
        args.inner, args.reps, args.steps = 2, 2, 4
    t0 = time.perf_counter()
    import triton

    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    print(f"device {name}; torch {torch.__version__}; triton {triton.__version__}; bf16; "
          f"{args.inner} calls per graph, median of {args.reps}")
    print(HEADER)
    rows = bench_kernels(args, device, t0)
    print(f"kernel table: {time.perf_counter() - t0:.0f} s")
    if not args.no_e2e:
        for row in rows:  # the end-to-end model decodes with the configs tuned on its own tier mix
            if (row["mix"], row["placement"]) == E2E_MIX and "decode_config" in row:
                set_decode_config((row["out"], row["inp"]), row["tokens"], tuple(row["decode_config"]))
        rows += bench_end_to_end(args, device)
    print(f"total: {time.perf_counter() - t0:.0f} s")
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
