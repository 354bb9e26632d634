"""Prefill through the wgmma kernels (kernels/cuda/wgmma_prefill.cu and the warp-specialized wgmma_prefill_ws.cu)
against cuBLAS and the op's unpack + cuBLAS.

Per LLaMA-2-7B shape (benchmarks/hybrid_kernels.py's SHAPES) and tier mix / placement, at --tokens tokens: cuBLAS
(F.linear on the dense-with-zeros weight), the op's prefill (unpack into a workspace, then cuBLAS), the wgmma
kernel with block-rows in order and grouped by their dense columns, and the warp-specialized kernel (grouped);
each timed over rotated weight copies (more bytes than the L2 holds), medians of CUDA-graph replays; ratios are
cuBLAS time / method time (> 1 is faster).
Also the share of (group, step) pairs that run as one sparse wgmma, the time to build a plan, and the kernels'
largest errors against the fp32 product.

Run (an H100 or H200):
    python benchmarks/wgmma_prefill.py
    python benchmarks/wgmma_prefill.py --tokens 512 2048 --shapes qkvo down
    python benchmarks/wgmma_prefill.py --ablate          # what each part of the loops costs (ABLATIONS,
                                                         # WS_ABLATIONS; or name some)
    python benchmarks/wgmma_prefill.py --profile         # one launch per variant and plan, under ncu (docs/kernels.md)
"""
from __future__ import annotations

import argparse
import time
import zlib

import torch
import torch.nn.functional as F

import hybrid_kernels as hk
from tierprune.kernels.cuda import wgmma_prefill as wp
from tierprune.kernels.hybrid import pack_hybrid
from tierprune.kernels.triton.hybrid_mm import hybrid_mm_prefill

CASES = (("35/45/20", "random"), ("35/45/20", "clustered"), ("90/10/0", "random"))

# --ablate: the kernel with one part of its loop changed or taken away, each an edit of its source (old, new).
# Except x-through-l2, the products are then wrong: only the time counts. Each also runs on two plans whose blocks
# are all empty (no weight loads, zero fragments), all steps dense or all sparse: the loop without the weights.
_NO_X = ("if (s + 2 < steps) load_x_step(", "if (false) load_x_step(")  # x copied for the first two steps only
_NO_BARRIER = ("        __syncthreads();\n", "")
_COMMIT = "        wgmma_commit();\n#if OVERLAP\n        wgmma_wait<1>();"
_COMMIT_PAIRS = (_COMMIT, "        if (s & 1) {\n" + _COMMIT + " }")  # 64 columns per commit group
# The plan's per-step reads from global memory (slots, sparse flag) replaced by empty blocks, every step of the
# kind of the first two: what the empty-block plans run, without the loads (their latency lies on each step's
# path). (Until session 36 every step after the second was dense here, so the "sparse steps" column of the
# variants with no plan loads timed dense steps.)
_NO_PLAN_LOADS = ("next_slots = *reinterpret_cast<const uint2*>(my_slots + 2 * s + 4);\n"
                  "                next_sparse = my_steps[s + 2];",
                  "next_slots = make_uint2(3u << 28, 3u << 28);\n                next_sparse = sparse;")
# This step's A built from nothing: the fragment code between the wgmmas gone (A stays zero; the loads remain).
_NO_FRAGMENTS = [("sparse_fragment(a[0], a[1], meta0, raw[0], lane);", ""),
                 ("sparse_fragment(a[2], a[3], meta1, raw[1], lane);", ""),
                 ("a[8] = sparse_metadata(meta0, meta1, t);", ""),
                 ("dense_fragment(a, raw[0], lane);", ""), ("dense_fragment(a + 4, raw[1], lane);", "")]


def _a_fixed(metadata: int) -> tuple[str, str]:
    """Both A sets zero from the start, their sparse metadata word `metadata` (the edit for a loop that never
    builds A)."""
    a = "{0, 0, 0, 0, 0, 0, 0, 0, " + hex(metadata) + "u}"
    return "u32 a_even[9], a_odd[9];", f"u32 a_even[9] = {a}, a_odd[9] = {a};"


_A_ZERO = _a_fixed(0)  # metadata 0: position 0 twice in every group
# y never stored (a test no accumulator passes, so the stores stay in the code but none is made): the epilogue's
# cost, which no other CTA's loop hides at one CTA per SM.
_NO_STORES = ("if (token < T && row < R) y[", "if (token < T && row < R && d[4 * j + i] == 1.25e37f) y[")
_BARE = [_NO_X, _NO_BARRIER, _NO_PLAN_LOADS, *_NO_FRAGMENTS, _A_ZERO]
ABLATIONS = {
    "kernel": [],
    "x-through-l2": [("cp.async.ca.shared.global", "cp.async.cg.shared.global")],  # .cg: as before session 36
    "no-x-copies": [_NO_X],
    "no-barrier": [_NO_BARRIER],
    "no-x-no-barrier": [_NO_X, _NO_BARRIER],
    "commit-pairs": [_COMMIT_PAIRS],
    "no-x-no-barrier-pairs": [_NO_X, _NO_BARRIER, _COMMIT_PAIRS],
    "no-plan-loads": [_NO_PLAN_LOADS],
    "no-x-no-barrier-no-plan-loads": [_NO_X, _NO_BARRIER, _NO_PLAN_LOADS],
    "no-fragments": [*_NO_FRAGMENTS, _A_ZERO],
    "bare-loop": _BARE,  # the wgmmas and their bookkeeping alone
    "bare-loop-no-stores": _BARE + [_NO_STORES],
    "bare-loop-pairs": _BARE + [_COMMIT_PAIRS],
    "bare-loop-pairs-no-stores": _BARE + [_COMMIT_PAIRS, _NO_STORES],
    "bare-loop-metadata-01": _BARE[:-1] + [_a_fixed(0x44444444)],  # positions 0 and 1, as real 2:4 blocks name
}
# The same for the warp-specialized kernel (wgmma_prefill_ws.cu): edits of its source.
_WS_NO_X = ("for (int i = 0; i < 8; ++i) {\n                const int piece",
            "for (int i = 0; i < 0; ++i) {\n                const int piece")  # the producer copies no x
WS_ABLATIONS = {
    "ws": [],
    "ws-no-x": [_WS_NO_X],
    "ws-no-stores": [_NO_STORES],  # the epilogue is wgmma_prefill.cu's
    "ws-no-x-no-stores": [_WS_NO_X, _NO_STORES],
    "ws-4-stages": [("#define STAGES 8", "#define STAGES 4")],  # half the ring: how far ahead the producer must be
}


def packed_copies(shape: tuple[int, int], mix: str, placement: str):
    """A pruned weight obeying a seeded tier map, its rotated copies (more bytes than the L2 holds) and their packs."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{shape} {mix} {placement}".encode()))
    tier_map = hk.make_tier_map(shape, hk.MIXES[mix], placement, g).cuda()
    W = hk.pruned_weight(shape, tier_map, "cuda", seed=0)
    weights = [W] + [W.clone() for _ in range(hk.copies_needed(W.numel() * W.element_size(), "cuda") - 1)]
    return W, weights, [pack_hybrid(w, tier_map) for w in weights]


def ablated_source(edits: list[tuple[str, str]], warp_specialized: bool = False) -> str:
    """The bf16 kernel's source for TopK(10) blocks (pack_hybrid's default) with `edits` applied, each once
    (`warp_specialized`: wgmma_prefill_ws.cu's)."""
    source = wp.prefill_kernel_source(False, 10, warp_specialized)
    for old, new in edits:
        if source.count(old) != 1:
            name = "wgmma_prefill_ws.cu" if warp_specialized else "wgmma_prefill.cu"
            raise SystemExit(f"--ablate: an edit no longer applies to {name}: {old!r}")
        source = source.replace(old, new)
    return source


def compile_variant(name: str):
    """An ABLATIONS or WS_ABLATIONS variant, compiled on the current device, and whether it is warp-specialized."""
    warp_specialized = name in WS_ABLATIONS
    edits = WS_ABLATIONS[name] if warp_specialized else ABLATIONS[name]
    source = ablated_source(edits, warp_specialized)
    return wp.compile_wgmma_prefill(source, torch.cuda.current_device(), warp_specialized=warp_specialized), \
        warp_specialized


def ablation_plans(plan: wp.PrefillPlan) -> dict[str, wp.PrefillPlan]:
    """The plan, and the same plan with every block empty (no weight loads, zero fragments), all steps dense or
    all sparse: the loop without the weights."""
    empty = plan._replace(slots=torch.full_like(plan.slots, wp.TIER_NONE << wp.TIER_SHIFT),
                          sparse_steps=torch.zeros_like(plan.sparse_steps))
    return {"plan": plan, "empty blocks, dense steps": empty,
            "empty blocks, sparse steps": empty._replace(sparse_steps=torch.ones_like(plan.sparse_steps))}


def _check_variants(variants: list[str], option: str) -> None:
    known = {**ABLATIONS, **WS_ABLATIONS}
    unknown = sorted(set(variants) - set(known))
    if unknown:
        raise SystemExit(f"{option}: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(known)}")


def profile(variants: list[str], tokens: int) -> None:
    """One launch of each variant (ABLATIONS, WS_ABLATIONS) on each of ablation_plans, 4096², 35/45/20 random, in
    the printed order: `ncu --kernel-name regex:hybrid_wgmma_prefill` numbers them 0, 1, ... in that order
    (docs/kernels.md)."""
    _check_variants(variants, "--profile")
    shape = hk.SHAPES["qkvo 4096x4096"]
    _, _, packed = packed_copies(shape, "35/45/20", "random")
    plans = ablation_plans(wp.prefill_plan(packed[0]))
    x = torch.randn(tokens, shape[1], device="cuda", dtype=torch.bfloat16)
    launch = 0
    for name in variants:
        kernel, warp_specialized = compile_variant(name)
        for plan_name, plan in plans.items():
            wp.hybrid_wgmma_prefill(x, packed[0], plan, kernel=kernel, warp_specialized=warp_specialized)
            torch.cuda.synchronize()
            print(f"launch {launch}: {name}, {plan_name} ({shape[0]}x{shape[1]}, T={tokens})", flush=True)
            launch += 1


def ablate(variants: list[str], shape_names: list[str] | None, tokens: int) -> None:
    """The ABLATIONS and WS_ABLATIONS named (all if none) side by side at 35/45/20 random and 90/10/0, grouped
    plans, × cuBLAS."""
    _check_variants(variants, "--ablate")
    kernels = {name: compile_variant(name) for name in variants or {**ABLATIONS, **WS_ABLATIONS}}
    shapes = {k: v for k, v in hk.SHAPES.items() if k.split()[0] in (shape_names or ["qkvo"])}
    for name, shape in shapes.items():
        for mix in ("35/45/20", "90/10/0"):
            _, weights, packed = packed_copies(shape, mix, "random")
            plan = wp.prefill_plan(packed[0])
            plans = ablation_plans(plan)
            x = torch.randn(tokens, shape[1], device="cuda", dtype=torch.bfloat16)
            cublas, _ = hk.measure_us([lambda w=w: F.linear(x, w) for w in weights], "cuda", inner=5, reps=7)
            print(f"{name} {mix} random, T={tokens}: cuBLAS {cublas:.1f} us; {plan.sparse_fraction:.2f} of the "
                  f"steps sparse; × cuBLAS:")
            for kernel_name, (kernel, ws) in kernels.items():
                row = []
                for plan_name, p in plans.items():
                    us, _ = hk.measure_us([lambda hw=hw, p=p: wp.hybrid_wgmma_prefill(x, hw, p, kernel=kernel,
                                                                                      warp_specialized=ws)
                                           for hw in packed], "cuda", inner=5, reps=7)
                    row.append(f"{plan_name} {cublas / us:.3f}")
                print(f"  {kernel_name:<22} " + "; ".join(row), flush=True)
            del weights, packed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[2048])
    parser.add_argument("--shapes", nargs="*", default=None, help="subset by first word, e.g. qkvo down")
    parser.add_argument("--ablate", nargs="*", metavar="VARIANT", default=None,
                        help="the kernel with parts of its loop taken away (ABLATIONS, all unless named; 35/45/20 "
                             "and 90/10/0 random, the first --tokens, qkvo unless --shapes)")
    parser.add_argument("--profile", nargs="*", metavar="VARIANT", default=None,
                        help="launch each ABLATIONS variant once per plan, for ncu (default: kernel and "
                             "no-x-no-barrier-no-plan-loads)")
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)):
        parser.error("needs an sm_90 GPU (H100 / H200)")
    print(torch.cuda.get_device_name())
    if args.profile is not None:
        return profile(args.profile or ["kernel", "no-x-no-barrier-no-plan-loads"], args.tokens[0])
    if args.ablate is not None:
        return ablate(args.ablate, args.shapes, args.tokens[0])
    shapes = {k: v for k, v in hk.SHAPES.items() if args.shapes is None or k.split()[0] in args.shapes}
    for name, shape in shapes.items():
        for mix, placement in CASES:
            W, weights, packed = packed_copies(shape, mix, placement)
            plans, plan_s = {}, {}
            for grouped in (False, True):
                start = time.perf_counter()
                plans[grouped] = wp.prefill_plan(packed[0], grouped=grouped)
                torch.cuda.synchronize()
                plan_s[grouped] = time.perf_counter() - start
            for tokens in args.tokens:
                x = torch.randn(tokens, shape[1], device="cuda", dtype=torch.bfloat16)
                reference = x.float() @ W.float().T
                errors = {ws: float((wp.hybrid_wgmma_prefill(x, packed[0], plans[True], warp_specialized=ws).float()
                                     - reference).abs().max() / reference.abs().max()) for ws in (False, True)}
                cublas, _ = hk.measure_us([lambda w=w: F.linear(x, w) for w in weights], "cuda", inner=5, reps=7)
                unpack, _ = hk.measure_us([lambda hw=hw: hybrid_mm_prefill(x, hw) for hw in packed], "cuda",
                                          inner=5, reps=7)
                row = []
                for grouped, plan in plans.items():
                    us, _ = hk.measure_us([lambda hw=hw: wp.hybrid_wgmma_prefill(x, hw, plan) for hw in packed],
                                          "cuda", inner=5, reps=7)  # the copies share one plan: the same map
                    row.append(f"{'grouped' if grouped else 'in order'} {cublas / us:.3f}x "
                               f"({plan.sparse_fraction:.2f} sparse, plan {plan_s[grouped]:.2f} s)")
                ws_us, _ = hk.measure_us([lambda hw=hw: wp.hybrid_wgmma_prefill(x, hw, plans[True],
                                                                                warp_specialized=True)
                                          for hw in packed], "cuda", inner=5, reps=7)
                tflops = 2 * tokens * shape[0] * shape[1] / cublas / 1e6
                print(f"{name:<25} {mix} {placement:<9} T={tokens}: cuBLAS {cublas:7.1f} us ({tflops:.0f} TFLOPS); "
                      f"unpack + cuBLAS {cublas / unpack:.3f}x; wgmma " + "; ".join(row) +
                      f"; warp-specialized, grouped {cublas / ws_us:.3f}x; error {errors[False]:.1e} / "
                      f"{errors[True]:.1e}")
            del weights, packed


if __name__ == "__main__":
    main()
