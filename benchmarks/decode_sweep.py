"""Sweep of the decode kernels' configurations at 1-16 tokens on the GPU: which kernel and config is fastest.

A narrower companion of hybrid_kernels.py (same weights, same timing: CUDA graphs over rotated weight copies,
CUDA events, medians) for finding why decode is far from bandwidth. Each case prints cuBLAS, then every
config as (NB, SPLIT, num_warps, token tile, prefetch) with its time and ratio, and the effective bandwidth of
the best (packed bytes + x + out over time). Imports only tierprune.kernels (no prefect, no transformers).

    python benchmarks/decode_sweep.py --shapes qkvo up down --tokens 1 16 --mixes 35/45/20 90/10/0
    python benchmarks/decode_sweep.py --tokens 1 --flat     # also the flat tier stream GEMV, FLAT configs
    python benchmarks/decode_sweep.py --tiny --device cpu --tokens 1 --flat --inner 1 --reps 1  # a CPU dry run

--flat times hybrid_mm_flat_gemv at one token as (NB, num_warps, nm_expand), after the per-block-row configs of the same
case, each against the same cuBLAS time; the JSON rows then carry `flat` and `flat_best`.
"""
from __future__ import annotations

import argparse
import json
import time
import zlib

import torch
import torch.nn.functional as F

from tierprune.kernels.hybrid import pack_hybrid
from tierprune.kernels.triton.flat_gemv import FlatGemvConfig, hybrid_mm_flat_gemv
from tierprune.kernels.triton.hybrid_mm import decode_config, hybrid_mm, hybrid_mm_decode

from hybrid_kernels import (BS, COMPILE_SCOPES, MIXES, SHAPES, TINY_SHAPES, TOPK_K, clone_hybrid, copies_needed,
                            make_tier_map, measure_us, pruned_weight)

GEMV = [(8, 4, 4, 1, True), (8, 8, 4, 1, True), (16, 4, 4, 1, True), (4, 8, 4, 1, True), (8, 2, 4, 1, True),
        (8, 16, 4, 1, True), (4, 8, 2, 1, True), (8, 4, 4, 1, False), (8, 8, 4, 1, False), (16, 4, 4, 1, False)]
TILES = [(8, 4, 4, 16, True), (8, 2, 4, 16, True), (4, 4, 4, 16, True), (8, 8, 4, 16, True),
         (8, 4, 4, 16, False), (4, 2, 4, 16, False), (8, 2, 4, 16, False), (8, 8, 4, 16, False)]
# The flat tier stream GEMV (--flat): (NB blocks per program, num_warps, 2:4 rebuilt as dense rows). Few warps
# per short program keep many programs resident per SM, which is how it hides latency; larger NB amortizes the
# per-program epilogue. Compiled for sm_90 the 2:4 rebuild takes ~1.6x the instructions of the x gathers but a
# third of the memory instructions: which limits is for the device to say.
# A fourth element False: the two-launch variant (no per-block-row counters; a second kernel writes the output),
# then chunks per program (default 1) and TopK blocks per chunk added entry by entry (0: as the other tiers).
FLAT = [(8, 1, False), (4, 1, False, False), (4, 1, False, False, 2), (8, 1, False, False, 2),
        (4, 1, False, False, 2, 4), (4, 1, False, False, 2, 8), (4, 1, False, False, 2, 16),
        (4, 1, False, False, 2, 32), (4, 1, False, False, 1, 16), (2, 1, False, False, 4, 16),
        (4, 1, False, False, 3, 16), (8, 1, False, False, 2, 16), (4, 2, False, False, 2, 32)]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="*", default=["qkvo", "up", "down"])
    p.add_argument("--tokens", type=int, nargs="*", default=[1, 16])
    p.add_argument("--mixes", nargs="*", default=["35/45/20", "90/10/0"])
    p.add_argument("--placements", nargs="*", default=["random"])
    p.add_argument("--e2e-layers", type=int, default=0, help="then decode end to end (hybrid_kernels.py's model) "
                                                              "with the best 35/45/20 random configs; 0: skip")
    p.add_argument("--e2e-compile", nargs="*", choices=COMPILE_SCOPES, default=[],
                   help="end to end, also torch.compile'd (dense and hybrid): the decoder layers and/or the whole step")
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--budget-s", type=float, default=150)
    p.add_argument("--heuristic-only", action="store_true",
                   help="of the per-block-row kernels time only the config decode_config picks (the op's default)")
    p.add_argument("--flat", action="store_true", help="at one token, also time the flat tier stream GEMV "
                                                       "(hybrid_mm_flat_gemv) over FLAT's (NB, warps, nm_expand)")
    p.add_argument("--e2e-flat-alternatives", nargs="*", default=[], metavar="NB,WARPS,COUNTED[,CHUNKS[,TOPK_NB]]",
                   help="end to end, also time these flat GEMV configs (e.g. 8,1,1,1: the counted kernel)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (all of them, --shapes ignored): a dry run")
    p.add_argument("--device", default="cuda", help="cpu: Triton's interpreter (TRITON_INTERPRET=1), timing "
                                                    "meaningless")
    args = p.parse_args(argv)
    device = args.device
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name() if device.startswith("cuda") else device
    print(f"{name} torch {torch.__version__}", flush=True)
    rows = []
    for shape_name, shape in (TINY_SHAPES if args.tiny else SHAPES).items():
        if not args.tiny and shape_name.split()[0] not in args.shapes:
            continue
        dense = None
        for mix_name, placement in [(m, pl) for pl in args.placements for m in args.mixes]:
            g = torch.Generator().manual_seed(zlib.crc32(f"{shape} {mix_name} {placement}".encode()))
            # A mix outside MIXES, e.g. 0/100/0 (every block 2:4), times one tier alone.
            mix = MIXES.get(mix_name) or tuple(float(v) / 100 for v in mix_name.split("/"))
            tier_map = make_tier_map(shape, mix, placement, g)
            W = pruned_weight(shape, tier_map, device, seed=1)
            hw = pack_hybrid(W, tier_map.to(device), block_size=BS, topk=TOPK_K)
            hws = [hw] + [clone_hybrid(hw) for _ in range(copies_needed(hw.nbytes, device) - 1)]
            if dense is None:
                dense = [W.clone() for _ in range(copies_needed(W.numel() * 2, device))]
            for T in args.tokens:
                if time.perf_counter() - t0 > args.budget_s:
                    print("budget reached", flush=True)
                    break
                x = (torch.randn(T, shape[1], device=device) * 0.5).to(torch.bfloat16)
                cublas, _ = measure_us([lambda w=w: F.linear(x, w) for w in dense], device, args.inner, args.reps)
                default, _ = measure_us([lambda h=h: hybrid_mm(x, h) for h in hws], device, args.inner, args.reps)
                ref = F.linear(x.float(), W.float())
                results = {}
                configs = GEMV if T == 1 else TILES
                if args.heuristic_only:
                    configs = [decode_config(hw, T, torch.cuda.get_device_properties(device).multi_processor_count
                                             if device == "cuda" else 132)]
                for cfg in configs:
                    nb, split, warps, tile, prefetch = cfg
                    fns = [lambda h=h: hybrid_mm_decode(x, h, nb=nb, split=split, num_warps=warps, token_tile=tile,
                                                        prefetch=prefetch) for h in hws]
                    try:
                        err = (fns[0]().float() - ref).abs().max().item() / ref.abs().max().item()
                        us, _ = measure_us(fns, device, args.inner, args.reps)
                    except Exception as e:  # a config that does not compile or fit: say so, keep sweeping
                        print(f"  {cfg}: failed {type(e).__name__}: {str(e)[:100]}", flush=True)
                        continue
                    results[cfg] = (us, err)
                best_cfg, (best_us, best_err) = min(results.items(), key=lambda kv: kv[1][0])
                moved = hw.nbytes + x.numel() * 2 + T * shape[0] * 2
                print(f"{shape_name:26} {mix_name:8} {placement:9} T={T:<3} cuBLAS {cublas:7.1f} us ({W.numel() * 2 / cublas / 1e3:6.0f} "
                      f"GB/s) default {default:7.1f} ({cublas / default:.2f}x) best {best_us:7.1f} "
                      f"({cublas / best_us:.2f}x, {moved / best_us / 1e3:6.0f} GB/s) {best_cfg} err {best_err:.1e}",
                      flush=True)
                for cfg, (us, err) in sorted(results.items(), key=lambda kv: kv[1][0]):
                    print(f"    {str(cfg):24} {us:7.1f} us {cublas / us:5.2f}x", flush=True)
                flat = {}
                for cfg in (FLAT if args.flat and T == 1 else []):
                    defaults = (True, 1, 0)  # counted, chunks, topk_nb
                    nb, warps, expand, counted, chunks, topk_nb = (*cfg, *defaults[len(cfg) - 3:])
                    fns = [lambda h=h: hybrid_mm_flat_gemv(x, h, nb=nb, num_warps=warps, nm_expand=expand,
                                                           counted=counted, chunks=chunks, topk_nb=topk_nb)
                           for h in hws]
                    try:  # the first call also builds each copy's block-row index (outside the graph)
                        err = (fns[0]().float() - ref).abs().max().item() / ref.abs().max().item()
                        us, _ = measure_us(fns, device, args.inner, args.reps)
                        # Checked again after the replays: a sum that landed after its block-row was written
                        # (an ordering bug in the last-contributor handshake) would stay in the workspace.
                        err = max(err, (fns[0]().float() - ref).abs().max().item() / ref.abs().max().item())
                    except Exception as e:
                        print(f"  flat {cfg}: failed {type(e).__name__}: {str(e)[:100]}", flush=True)
                        continue
                    flat[cfg] = (us, err)
                if flat:
                    flat_cfg, (flat_us, flat_err) = min(flat.items(), key=lambda kv: kv[1][0])
                    print(f"  flat tier stream, one launch: best {flat_us:7.1f} us ({cublas / flat_us:.2f}x cuBLAS, "
                          f"{moved / flat_us / 1e3:6.0f} GB/s, {best_us / flat_us:.2f}x the best above) "
                          f"(NB, warps, 2:4 rebuilt[, counted, chunks, topk_nb]) {flat_cfg} err {flat_err:.1e}", flush=True)
                    for cfg, (us, err) in sorted(flat.items(), key=lambda kv: kv[1][0]):
                        print(f"    flat {str(cfg):19} {us:7.1f} us {cublas / us:5.2f}x err {err:.1e}", flush=True)
                row = dict(shape=shape_name, out=shape[0], inp=shape[1], mix=mix_name, placement=placement,
                           tokens=T, best=list(best_cfg), best_us=best_us, cublas_us=cublas, default_us=default,
                           configs={str(k): v[0] for k, v in results.items()}, packed_bytes=hw.nbytes)
                if flat:
                    row.update(flat={str(k): v[0] for k, v in flat.items()}, flat_best=list(flat_cfg),
                               flat_best_us=flat_us, flat_err=flat_err)
                rows.append(row)
            del hws, hw
        del dense
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"sweep {time.perf_counter() - t0:.0f} s", flush=True)
    if args.e2e_layers:
        from hybrid_kernels import bench_end_to_end

        from tierprune.kernels.triton.hybrid_mm import set_decode_config

        for r in rows:
            if (r["mix"], r["placement"]) == ("35/45/20", "random"):
                set_decode_config((r["out"], r["inp"]), r["tokens"], tuple(r["best"]))
        alternatives = []
        for a in args.e2e_flat_alternatives:
            nb, warps, counted, *rest = (int(v) for v in a.split(","))  # rest: chunks, topk_nb
            alternatives.append(FlatGemvConfig(nb, warps, bool(counted), *rest))
        rows += bench_end_to_end(argparse.Namespace(tiny=False, layers=args.e2e_layers, steps=128, no_graph=False,
                                                    flat_alternatives=alternatives, compile=args.e2e_compile),
                                 device)
    print(f"total {time.perf_counter() - t0:.0f} s")
    for r in rows:
        print(json.dumps(r))
    return rows


if __name__ == "__main__":
    main()
