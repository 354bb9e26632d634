"""The tensor-core decode kernel (tierprune/kernels/cuda/mma_decode.py, mma_decode.cu).

On the CPU: the bit-level recipe the kernel follows (which word of which buffer a lane reads, the 2:4 nibble,
the byte-permute selectors, the column order shared by the A and B fragments, and the sparse tensor cores'
fragment and metadata) is replayed in torch on real packed weights and must give the blocks and the product;
and the CUDA source compiles for sm_90 with NVRTC (the pip package), to PTX with the expected mma and atomics
(none in the row kernel), which Triton's ptxas assembles without spills. On CUDA: the kernel against the reference, and the row kernel's bits from call to call.
"""
from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tierprune.kernels.cuda import mma_decode as md
from tierprune.kernels.hybrid import pack_hybrid
from tierprune.kernels.tiers import tier_keep_mask
from tierprune.kernels.triton.flat_gemv import decode_workspace

from .test_hybrid import pruned_weight, random_tier_map

pytestmark = pytest.mark.unit
HAS_CUDA = torch.cuda.is_available()


def byte_perm(a: torch.Tensor, b: int, selector: torch.Tensor) -> torch.Tensor:
    """CUDA's __byte_perm(a, b, s) on int64 tensors holding 32-bit words (default mode)."""
    source = (a & 0xFFFFFFFF) | (b & 0xFFFFFFFF) << 32  # bytes 0-3 from a, 4-7 from b
    out = torch.zeros_like(a)
    for byte in range(4):
        pick = (selector >> (4 * byte)) & 7
        out |= ((source >> (8 * pick)) & 0xFF) << (8 * byte)
    return out


def halves(word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return word & 0xFFFF, (word >> 16) & 0xFFFF


def test_selector_table_spreads_each_pair_of_kept_values() -> None:
    table = md.selector_table().long()
    v0, v1 = 0x1234, 0xABCD
    word = torch.tensor(v0 | v1 << 16)
    for p0 in range(4):
        for p1 in range(p0 + 1, 4):
            sel = table[p0 | p1 << 2]
            columns = [*halves(byte_perm(word, 0, sel[0])), *halves(byte_perm(word, 0, sel[1]))]
            expected = [v0 if c == p0 else v1 if c == p1 else 0 for c in range(4)]
            assert [int(c) for c in columns] == expected, (p0, p1)


def _words(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The buffer reinterpreted as the kernel reads it, as unsigned int64."""
    w = t.contiguous().view(dtype).long()
    return w & ((1 << (8 * torch.tensor([], dtype=dtype).element_size())) - 1)


def _as_values(halfwords: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return halfwords.to(torch.int16).view(dtype)  # wraps > 0x7FFF to the same 16 bits


def replay_fragments(hw) -> dict[str, torch.Tensor]:
    """Each tier's blocks (n, 16, 16) as the kernel's lanes assemble them: lane (g, t) holds physical columns
    4t..4t+3 of rows g and g+8, whatever the tier. Dense: 8-byte words g·4+t; 2:4: the kept pair word and the
    row's 16-bit meta, spread by the selector table; TopK: scattered into a zeroed tile."""
    n_dense, n_nm, n_topk = hw.tier_counts()
    dt = hw.dtype
    out = {}
    words = _words(hw.dense_values, torch.int64).view(n_dense, 64) if n_dense else torch.zeros(0, 64).long()
    lanes = []
    for g in range(16):  # rows g (and g + 8 through the same rule)
        for t in range(4):
            w = words[:, g * 4 + t]
            lanes.append(torch.stack([*halves(w), *halves(w >> 32)], -1))  # (n, 4)
    out["dense"] = _as_values(torch.stack(lanes, 1).view(n_dense, 16, 16), dt)
    if n_nm:
        values = _words(hw.nm_values, torch.int32).view(n_nm, 16, 4)  # (n, row, group): kept pair
        meta = _words(hw.nm_meta, torch.int16).view(n_nm, 16)  # (n, row)
        table = md.selector_table().long()
        cols = []
        for t in range(4):
            nibble = (meta >> (4 * t)) & 15
            sel = table[nibble]  # (n, 16, 2)
            v = values[:, :, t]
            cols.append(torch.stack([*halves(byte_perm(v, 0, sel[..., 0])), *halves(byte_perm(v, 0, sel[..., 1]))],
                                    -1))
        out["nm"] = _as_values(torch.cat(cols, -1), dt)  # (n, 16, 16)
    else:
        out["nm"] = torch.zeros(0, 16, 16, dtype=dt)
    tiles = torch.zeros(n_topk, 256, dtype=dt)
    tiles.scatter_(1, hw.topk_pos.long(), hw.topk_values)
    out["topk"] = tiles.view(n_topk, 16, 16)
    return out


def replay_product(x: torch.Tensor, hw) -> torch.Tensor:
    """x @ W.T summed block by block the kernel's way: A's logical column k of lane t is physical column
    4t + (k - 2t) for k in {2t, 2t+1} and 4t + 2 + (k - 2t - 8) for k in {2t+8, 2t+9}; B's logical row k of
    x is the same physical column; the mma sums over logical k. In float64."""
    logical_to_physical = torch.tensor([4 * (k % 8 // 2) + k % 2 + 2 * (k // 8) for k in range(16)])
    assert sorted(logical_to_physical.tolist()) == list(range(16))
    T, (n_out, k_in) = x.shape[0], hw.shape
    nbr = len(hw.dense_row_ptr) - 1
    acc = torch.zeros(T, nbr * 16, dtype=torch.float64)
    blocks = replay_fragments(hw)
    for name, row_ptr, cols in (("dense", hw.dense_row_ptr, hw.dense_cols), ("nm", hw.nm_row_ptr, hw.nm_cols),
                                ("topk", hw.topk_row_ptr, hw.topk_cols)):
        rows = torch.repeat_interleave(torch.arange(nbr), (row_ptr[1:] - row_ptr[:-1]).long())
        for block, row, col in zip(blocks[name], rows.tolist(), cols.tolist()):
            A = block.double()[:, logical_to_physical]  # (16 rows, 16 logical k)
            B = x.double()[:, col * 16 + logical_to_physical].T  # (16 logical k, T)
            acc[:, row * 16:row * 16 + 16] += (A @ B).T
    return acc[:, :n_out]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,probs", [((64, 96), (0.35, 0.45, 0.20)), ((40, 64), (0.2, 0.6, 0.2)),
                                         ((32, 48), (0.0, 1.0, 0.0))])
def test_replayed_fragments_rebuild_the_blocks_and_the_product(shape, probs, dtype) -> None:
    g = torch.Generator().manual_seed(7)
    tier_map = random_tier_map(shape, g, probs)
    W = pruned_weight(shape, tier_map, g, dtype)
    hw = pack_hybrid(W, tier_map)
    blocks = replay_fragments(hw)
    nbr, nbc = -(-shape[0] // 16), -(-shape[1] // 16)
    full = torch.zeros(nbr, 16, nbc, 16, dtype=dtype)
    for name, row_ptr, cols in (("dense", hw.dense_row_ptr, hw.dense_cols), ("nm", hw.nm_row_ptr, hw.nm_cols),
                                ("topk", hw.topk_row_ptr, hw.topk_cols)):
        rows = torch.repeat_interleave(torch.arange(len(row_ptr) - 1), (row_ptr[1:] - row_ptr[:-1]).long())
        full[rows, :, cols.long(), :] = blocks[name]
    full = full.view(nbr * 16, nbc * 16)
    assert torch.equal(full[:shape[0], :shape[1]], hw.to_dense())
    assert not full[shape[0]:].any() and not full[:, shape[1]:].any()  # edge blocks padded with zeros
    x = torch.randn(5, shape[1], generator=g).to(dtype)
    torch.testing.assert_close(replay_product(x, hw), x.double() @ W.double().T, rtol=1e-9, atol=1e-9)


def sparse_fragments(hw) -> torch.Tensor:
    """The 2:4 blocks (n, 16, 16) as mma.sp m16n8k16 reads them where SPARSE_24 (PTX ISA, sparse A of 16-bit types):
    lane (g, t) gives the kept pair of group t in rows g (value word g·4+t) and g+8 (word 32+g·4+t); lane t = 0 of
    quad g gives the metadata, row g's 16 bits low and row g+8's high, group j's two 2-bit positions at bits 4j and
    4j+2. No column trick: B is x in the block's own column order."""
    n_nm = hw.tier_counts()[1]
    words = _words(hw.nm_values, torch.int32).view(n_nm, 64)
    meta = _words(hw.nm_meta, torch.int16).view(n_nm, 16)
    blocks = torch.zeros(n_nm, 16, 16, dtype=torch.long)
    for g in range(8):
        e = meta[:, g] | meta[:, g + 8] << 16  # the quad's metadata word, as the kernel assembles it
        for row, a, bits in ((g, 0, 0), (g + 8, 32, 16)):
            for t in range(4):
                low, high = halves(words[:, a + g * 4 + t])
                nibble = (e >> (bits + 4 * t)) & 15
                for value, position in ((low, nibble & 3), (high, nibble >> 2)):
                    blocks[torch.arange(n_nm), row, 4 * t + position] = value
    return _as_values(blocks, hw.dtype)


def test_2_4_blocks_as_the_sparse_tensor_cores_read_them_are_the_blocks() -> None:
    g = torch.Generator().manual_seed(5)
    shape = (64, 96)
    tier_map = random_tier_map(shape, g, (0.2, 0.6, 0.2))
    W = pruned_weight(shape, tier_map, g)
    W[:16, :8] = 0  # all-zero and one-value groups still store two distinct positions
    W[16, 1:4] = 0
    hw = pack_hybrid(W, tier_map)
    assert torch.equal(sparse_fragments(hw), replay_fragments(hw)["nm"])
    # mma.sp's metadata: in each group the first position below the second (0b0000, 0b0101, 0b1010 and 0b1111
    # are undefined), as pack_hybrid stores them
    nibbles = torch.stack([(_words(hw.nm_meta, torch.int16) >> (4 * j)) & 15 for j in range(4)])
    assert ((nibbles & 3) < (nibbles >> 2)).all()


def _nvrtc() -> ctypes.CDLL:
    nvrtc = pytest.importorskip("nvidia.cuda_nvrtc", reason="the nvidia-cuda-nvrtc-cu12 test dependency")
    lib_dir = Path(next(iter(nvrtc.__path__))) / "lib"
    return ctypes.CDLL(str(next(lib_dir.glob("libnvrtc.so.*[0-9]"))))


def nvrtc_ptx(source: str, arch: str = "sm_90") -> str:
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"mma_decode.cu", 0, None, None) == 0
    options = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"]
    status = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert status == 0, log.value.decode()
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value.decode()


def row_kernel_visits(row_ptr: list[int], cols: list[int], warps: int, ch: int) -> list[tuple[int, int]]:
    """(block, column the lane shuffle gives it) for every block the row kernel's warps take, replaying its loops:
    warp w of block-row r takes steps of `ch` blocks from row_ptr[r] + w·ch, warps·ch apart, and step_cols loads
    the columns of 32 // ch steps at a time (lane l: step l // ch, block l % ch)."""
    def step_cols(start: int, end: int) -> list[int]:
        blocks = [start + (lane // ch) * warps * ch + lane % ch for lane in range(32)]
        return [cols[b] if lane < 32 // ch * ch and b < end else 0 for lane, b in enumerate(blocks)]

    visits = []
    for r in range(len(row_ptr) - 1):
        for warp in range(warps):
            first, end = row_ptr[r] + warp * ch, row_ptr[r + 1]
            lane_cols, step = step_cols(first, end), 0
            for start in range(first, end, warps * ch):
                if step == 32 // ch:
                    lane_cols, step = step_cols(start, end), 0
                visits += [(start + i, lane_cols[step * ch + i]) for i in range(min(ch, end - start))]
                step += 1
    return visits


@pytest.mark.parametrize("warps,ch", [(8, 8), (4, 12), (2, 5), (1, 32), (3, 7)])
def test_row_kernel_takes_every_block_once_with_its_column(warps, ch) -> None:
    """The row kernel's split of a block-row over warps and steps, and the column each step's shuffle reads,
    on block-rows of 0 to 300 blocks (several column loads per warp where a warp takes more than 32 // ch steps)."""
    g = torch.Generator().manual_seed(11)
    per_row = [0, 1, ch - 1, ch, warps * ch + 1, 300, 37]
    row_ptr = [0]
    for n in per_row:
        row_ptr.append(row_ptr[-1] + n)
    cols = torch.randint(0, 1000, (row_ptr[-1],), generator=g).tolist()
    visits = row_kernel_visits(row_ptr, cols, warps, ch)
    assert sorted(block for block, _ in visits) == list(range(row_ptr[-1]))
    assert all(col == cols[block] for block, col in visits)


@pytest.mark.parametrize("topk,ntile,half,config", [
    (10, 1, False, md.MMA_DECODE_CONFIG), (10, 2, False, md.MMA_DECODE_CONFIG), (16, 2, True, md.MMA_DECODE_CONFIG),
    (1, 1, False, md.MmaDecodeConfig(16, 32, 8)), (32, 2, False, md.MmaDecodeConfig(12, 5, 4)),
    *((10, tiles, half, choice.config) for tiles, ladder in md.ROWS_DECODE_LADDERS.items() for choice in ladder
      for half in (False, True)),
])
def test_source_compiles_for_hopper_without_spills(topk, ntile, half, config, tmp_path) -> None:
    # x row-major (block-major: test_the_row_kernel_reading_x_block_major_compiles_without_spills)
    ptx = nvrtc_ptx(md.kernel_source(half, topk, ntile, config))
    mma = "mma.sync.aligned.m16n8k16.row.col.f32." + ("f16.f16" if half else "bf16.bf16") + ".f32"
    assert ptx.count(mma) >= 3 * ntile  # one per tier at least, per 8-token tile
    assert ".entry hybrid_mma_decode" in ptx and ".entry hybrid_cast_and_zero" in ptx
    assert re.search(r"red\.global\.add\.f32|atom\.global\.add\.f32", ptx)
    # Dense and 2:4 weights are read once and skip L1, which keeps the x fragments (measured 1-6% faster).
    assert "ld.global.nc.L1::no_allocate.v2.u32" in ptx and "ld.global.nc.L1::no_allocate.u32" in ptx
    # Triton's ptxas may be older than this NVRTC's PTX ISA; the kernel uses nothing newer than sm_90's.
    report = ptxas_report(ptx, tmp_path)
    # The row kernel adds its warps' sums in a fixed order (no atomics: the same bits on every call).
    rows_ptx = ptx.split(".entry hybrid_rows_decode")[1]
    assert not re.search(r"\b(red|atom)\.", rows_ptx.split(".entry ")[0])
    for kernel in ("hybrid_mma_decode", "hybrid_rows_decode"):
        properties = report.split(f"Function properties for {kernel}\n")[1].split("Function properties for")[0]
        assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in properties, (kernel, properties)
        registers = int(re.search(r"Used (\d+) registers", properties).group(1))
        assert registers <= 65536 // (32 * config.warps), (kernel, registers)  # the CTA fits an SM


def ptxas_report(ptx: str, tmp_path: Path, arch: str = "sm_90", isa: str = "8.0") -> str:
    """ptxas -v's report for `arch` (Triton's ptxas; it may be older than this NVRTC's PTX ISA, so the PTX is
    labelled `isa`, the oldest that has what the kernels use: 8.0 for sm_90's, 8.2 for sparse wgmma)."""
    triton = pytest.importorskip("triton")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    (tmp_path / "k.ptx").write_text(re.sub(r"^\.version \d+\.\d+", f".version {isa}", ptx, flags=re.M))
    return subprocess.run([str(ptxas), f"-arch={arch}", "-v", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
                          capture_output=True, text=True, check=True).stderr


def ctas_per_sm(registers: int, warps: int) -> int:
    """CTAs of `warps` warps an sm_90 SM holds at `registers` per thread (allocated 8 at a time, 64K per SM; 64
    warps and 32 CTAs per SM at most)."""
    return min(65536 // (-(-registers // 8) * 8 * 32 * warps), 64 // warps, 32)


@pytest.mark.parametrize("tiles,choice", [(tiles, choice) for tiles, ladder in md.ROWS_DECODE_LADDERS.items()
                                          for choice in ladder])
def test_each_row_config_fits_the_ctas_per_sm_it_claims(tiles, choice, tmp_path) -> None:
    """The ladder picks a config by how many of its CTAs an SM holds: that count, from its registers (allocated
    8 per thread at a time, 64K per SM), its warps (64 per SM) and CTAs (32 per SM), must be what ptxas gives
    (x row-major, 2:4 blocks both ways at one tile, as the op runs 1-6 and 7-8 tokens; block-major:
    test_the_row_kernel_reading_x_block_major_compiles_without_spills)."""
    for sparse_24 in (False, True) if tiles == 1 else (False,):
        source = md.kernel_source(False, 10, tiles, choice.config, sparse_24=sparse_24)
        report = ptxas_report(nvrtc_ptx(source), tmp_path)
        properties = report.split("Function properties for hybrid_rows_decode\n")[1].split("Function properties for")[0]
        assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in properties, properties
        registers = int(re.search(r"Used (\d+) registers", properties).group(1))
        assert ctas_per_sm(registers, choice.config.warps) == choice.ctas_per_sm, (registers, choice, sparse_24)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("tiles,choice", [(tiles, choice) for tiles, ladder in md.ROWS_DECODE_LADDERS.items()
                                          for choice in ladder])
def test_the_fitted_carveout_leaves_l1_and_keeps_the_ctas_per_sm(tiles, choice) -> None:
    """Loading the row kernel sets its shared-memory carve-out to fit its resident CTAs (launch.py): less than
    all of the shared memory, and with it the driver still places as many CTAs per SM as the ladder counts on."""
    from tierprune.kernels.cuda.launch import _FUNC_PREFERRED_SHARED_MEMORY_CARVEOUT, _driver

    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        pytest.skip("the ladder's counts are sm_90's")
    for sparse_24 in (False, True) if tiles == 1 else (False,):  # as the op runs 7-8 and 1-6 tokens
        kernel = md._module(False, 10, tiles, choice.config, "90", torch.cuda.current_device(),
                            sparse_24=sparse_24)["hybrid_rows_decode"]
        library, function = _driver()[0], ctypes.c_void_p(kernel.func if isinstance(kernel.func, int)
                                                          else kernel.func.value)
        carveout, ctas = ctypes.c_int(), ctypes.c_int()
        assert library.cuFuncGetAttribute(ctypes.byref(carveout), _FUNC_PREFERRED_SHARED_MEMORY_CARVEOUT,
                                         function) == 0
        assert 0 < carveout.value < 100
        assert library.cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(ctas), function, 32 * choice.config.warps, ctypes.c_size_t(0)) == 0
        assert ctas.value == choice.ctas_per_sm, sparse_24
    kernel = md._module(False, 10, tiles, choice.config, "90", torch.cuda.current_device(), x_block_major=True,
                        sparse_24=True)["hybrid_rows_decode"]
    function = ctypes.c_void_p(kernel.func if isinstance(kernel.func, int) else kernel.func.value)
    assert library.cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(ctas), function, 32 * choice.config.warps, ctypes.c_size_t(0)) == 0
    assert ctas.value == choice.ctas_per_sm_x_block_major


@pytest.mark.parametrize("tiles,choice", [(tiles, choice) for tiles, ladder in md.ROWS_DECODE_LADDERS.items()
                                          for choice in ladder])
def test_the_row_kernel_reading_x_block_major_compiles_without_spills(tiles, choice, tmp_path) -> None:
    """X_BLOCK_MAJOR (x as (in/16, tokens, 16)) on every rung, with 2:4 blocks on the sparse tensor cores as the op
    runs it: nothing spills (indexed in u16s, it did), and each rung holds the CTAs per SM the ladder counts for
    block-major x (fewer than row-major on the last two rungs of 9-16 tokens: 76 registers)."""
    ptx = nvrtc_ptx(md.kernel_source(False, 10, tiles, choice.config, x_block_major=True, sparse_24=True))
    assert "mma.sp.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx
    report = ptxas_report(ptx, tmp_path)
    properties = report.split("Function properties for hybrid_rows_decode\n")[1].split("Function properties for")[0]
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in properties, properties
    registers = int(re.search(r"Used (\d+) registers", properties).group(1))
    assert ctas_per_sm(registers, choice.config.warps) == choice.ctas_per_sm_x_block_major, (registers, choice)


def weight_like(out: int, k_in: int, mix: tuple[float, float, float]) -> SimpleNamespace:
    """What the x-layout rule reads of a packed weight: its shape, block-rows and blocks per tier."""
    blocks = (out // 16) * (k_in // 16)
    counts = (round(mix[0] * blocks), round(mix[1] * blocks), blocks - round(mix[0] * blocks) - round(mix[1] * blocks))
    return SimpleNamespace(shape=(out, k_in), dense_row_ptr=list(range(out // 16 + 1)), tier_counts=lambda: counts)


@pytest.mark.parametrize("tokens,shape,mix,block_major", [
    # x over 256 KiB (2 bytes a value), whatever the mix
    ((16, (4096, 11008), (0.9, 0.1, 0.0), True)), ((12, (4096, 11008), (0.9, 0.1, 0.0), True)),
    ((10, (5120, 13824), (0.35, 0.45, 0.2), True)), ((16, (4096, 8192), (0.9, 0.1, 0.0), False)),
    # a third or more 2:4, more than two block-rows per SM, its rung resident block-major
    ((16, (11008, 4096), (0.35, 0.45, 0.2), True)), ((9, (22016, 4096), (0.35, 0.45, 0.2), True)),
    ((12, (5120, 5120), (0.35, 0.45, 0.2), True)), ((9, (12288, 4096), (0.0, 1 / 3, 2 / 3), True)),
    ((16, (11008, 4096), (0.9, 0.1, 0.0), False)),  # few 2:4 blocks
    ((16, (4096, 4096), (0.35, 0.45, 0.2), False)),  # 256 block-rows: 1.94 per SM
    ((12, (13824, 5120), (0.35, 0.45, 0.2), False)),  # 864 block-rows: more than 6 CTAs per SM block-major
    ((9, (4096, 11008), (0.35, 0.45, 0.2), False)),  # x 198 KiB, 256 block-rows
    # one token tile: never
    ((8, (4096, 11008), (0.35, 0.45, 0.2), False)), ((1, (22016, 4096), (0.0, 1.0, 0.0), False)),
])
def test_x_is_read_block_major_at_9_to_16_tokens_where_it_pays(tokens, shape, mix, block_major, monkeypatch) -> None:
    """The op's rule (sessions 30 and 31, H100, 132 SMs)."""
    monkeypatch.setattr(md, "_multiprocessors", lambda device: 132)
    assert md.X_BLOCK_MAJOR_TILES is None
    assert md._x_block_major(tokens, weight_like(*shape, mix), torch.device("cuda")) == block_major


@pytest.mark.parametrize("tokens,block_major,sparse", [
    (1, False, True), (6, False, True), (7, False, False), (8, False, False), (16, False, False), (16, True, True),
    (12, True, True),
])
def test_2_4_blocks_go_to_the_sparse_tensor_cores_at_1_to_6_tokens_and_with_x_block_major(tokens, block_major,
                                                                                         sparse) -> None:
    """The op's rule (session 31, H100): where x's loads are few (1-6 tokens) or contiguous (block-major)."""
    assert md.SPARSE_24_FORCED is None and md._sparse_24(tokens, block_major) == sparse


def test_sparse_24_forced_overrides_the_rule(monkeypatch) -> None:
    monkeypatch.setattr(md, "SPARSE_24_FORCED", False)
    assert not md._sparse_24(1, True)
    monkeypatch.setattr(md, "SPARSE_24_FORCED", True)
    assert md._sparse_24(16, False)


@pytest.mark.parametrize("half", [False, True])
def test_the_sparse_2_4_source_compiles_for_both_dtypes(half, tmp_path) -> None:
    ptx = nvrtc_ptx(md.kernel_source(half, 10, 1, md.ROWS_DECODE_LADDERS[1][0].config, sparse_24=True))
    dtype = "f16.f16" if half else "bf16.bf16"
    assert ptx.count(f"mma.sp.sync.aligned.m16n8k16.row.col.f32.{dtype}.f32") >= 1
    report = ptxas_report(ptx, tmp_path)
    assert report.count("0 bytes spill stores") == report.count("Function properties for"), report


def test_x_block_major_tiles_forces_the_layout_whatever_the_weight(monkeypatch) -> None:
    monkeypatch.setattr(md, "_multiprocessors", lambda device: 132)
    monkeypatch.setattr(md, "X_BLOCK_MAJOR_TILES", (1,))
    cuda = torch.device("cuda")
    assert md._x_block_major(3, weight_like(64, 64, (1.0, 0.0, 0.0)), cuda)
    assert not md._x_block_major(16, weight_like(4096, 11008, (0.35, 0.45, 0.2)), cuda)


@pytest.mark.parametrize("tokens,tile_tokens", [(9, 16), (16, 16), (3, 8)])
def test_x_by_block_columns_puts_each_block_columns_tokens_together(tokens, tile_tokens) -> None:
    """The layout the row kernel reads at 9-16 tokens: word col·(tile_tokens·4) + token·4 + t of it (8-byte
    words, as the kernel indexes them) holds x[token, 16·col + 4t .. 16·col + 4t + 3]."""
    x = torch.randn(tokens, 64).to(torch.bfloat16)
    by_block = md.x_by_block_columns(x, tile_tokens)
    assert by_block.shape == (4, tile_tokens, 16) and by_block.is_contiguous()
    words = by_block.view(-1, 4)
    for col in range(4):
        for token in range(tokens):
            for t in range(4):
                got = words[col * (tile_tokens * 4) + token * 4 + t]
                assert torch.equal(got, x[token, 16 * col + 4 * t: 16 * col + 4 * t + 4])


def test_supported_refuses_what_the_kernel_cannot_take() -> None:
    g = torch.Generator().manual_seed(0)
    tier_map = random_tier_map((32, 64), g)
    hw = pack_hybrid(pruned_weight((32, 64), tier_map, g), tier_map)
    x = torch.randn(1, 64).to(torch.bfloat16)
    assert not md.mma_decode_supported(x, hw)  # on the CPU
    if HAS_CUDA:
        hw_cuda = hw.to("cuda")
        assert md.mma_decode_supported(x.cuda(), hw_cuda)
        assert not md.mma_decode_supported(torch.randn(17, 64, device="cuda").to(torch.bfloat16), hw_cuda)
        assert not md.mma_decode_supported(x.cuda().half(), hw_cuda)
    with pytest.raises(AssertionError, match="chunks must be 1..32"):
        md.kernel_source(False, 10, 1, md.MmaDecodeConfig(chunk=64))
    with pytest.raises(AssertionError, match="chunks must be 1..32"):
        md.kernel_source(False, 10, 1, md.MmaDecodeConfig(topk_chunk=0))


needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("shape,probs,topk", [
    ((64, 96), (0.35, 0.45, 0.20), 10), ((200, 512), (0.35, 0.45, 0.20), 16), ((48, 208), (0.0, 0.0, 1.0), 32),
    ((256, 256), (1.0, 0.0, 0.0), 10), ((256, 256), (0.0, 1.0, 0.0), 10), ((1000, 1024), (0.2, 0.2, 0.6), 4),
    ((80, 11008), (0.35, 0.45, 0.20), 10),  # 16 tokens of it are 344 KiB: the row kernel reads x block-major
    ((4400, 256), (0.2, 0.6, 0.2), 10),  # 275 block-rows, mostly 2:4: x block-major at 9-16 tokens on 132 SMs
])
def test_kernel_matches_reference_and_leaves_the_workspace_zeroed(shape, probs, topk, tokens, dtype) -> None:
    g = torch.Generator().manual_seed(3)
    tier_map = random_tier_map(shape, g, probs)
    W = torch.randn(shape, generator=g).to(dtype)
    W = W * tier_keep_mask(W.float().abs(), tier_map, 16, topk)
    hw = pack_hybrid(W, tier_map, topk=topk).to("cuda")
    x = torch.randn(tokens, shape[1], generator=g).to(dtype).cuda()
    expected = x.double().cpu() @ W.double().T
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    # the default config and odd chunks, each twice, every call starting from the workspace the previous one left
    for config in [md.MMA_DECODE_CONFIG, md.MmaDecodeConfig(5, 7, 2)] * 2:
        got = md.hybrid_mm_mma(x, hw, config)
        torch.testing.assert_close(got.double().cpu(), expected, rtol=tol, atol=tol * expected.abs().max().item())
        # the row kernel: every block-row's blocks split over the CTA's warps, chunks that end mid-row
        got = md.hybrid_mm_rows(x, hw, config)
        torch.testing.assert_close(got.double().cpu(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    _, workspace = decode_workspace(hw, tokens, create=False)
    assert int(torch.count_nonzero(workspace)) == 0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("sparse_24", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 5, 8, 12, 16])
@pytest.mark.parametrize("shape,probs", [((64, 96), (0.35, 0.45, 0.20)), ((256, 256), (0.0, 1.0, 0.0)),
                                         ((80, 11008), (0.2, 0.6, 0.2))])  # x block-major at 12-16 tokens
def test_2_4_blocks_either_way_match_the_reference(shape, probs, tokens, dtype, sparse_24, monkeypatch) -> None:
    """Both 2:4 paths at every token count and x layout, whatever the rule picks: the sparse tensor cores
    (metadata as packed) and the byte permutes."""
    monkeypatch.setattr(md, "SPARSE_24_FORCED", sparse_24)
    g = torch.Generator().manual_seed(17)
    tier_map = random_tier_map(shape, g, probs)
    W = pruned_weight(shape, tier_map, g, dtype)
    hw = pack_hybrid(W, tier_map).to("cuda")
    x = torch.randn(tokens, shape[1], generator=g).to(dtype).cuda()
    expected = x.double().cpu() @ W.double().T
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for run in (md.hybrid_mm_rows, md.hybrid_mm_mma):
        torch.testing.assert_close(run(x, hw).double().cpu(), expected, rtol=tol,
                                   atol=tol * expected.abs().max().item())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 9, 16])
def test_the_row_kernel_gives_the_same_bits_on_every_call(tokens) -> None:
    """Greedy decoding repeats itself only if a product does: the row kernel adds its warps' sums in a fixed order.
    Long block-rows (256 blocks) under the 16-warp configs, so that every warp holds part of every output."""
    g = torch.Generator().manual_seed(13)
    shape = (128, 4096)
    tier_map = random_tier_map(shape, g)
    W = pruned_weight(shape, tier_map, g)
    hw = pack_hybrid(W, tier_map).to("cuda")
    x = torch.randn(tokens, shape[1], generator=g).to(torch.bfloat16).cuda()
    config = md.rows_decode_config(hw, x.device, tokens)  # what the op picks: 8 block-rows, all resident
    assert config.warps == 16
    first = md.hybrid_mm_rows(x, hw, config)
    for _ in range(50):
        assert torch.equal(md.hybrid_mm_rows(x, hw, config), first)
    expected = x.double().cpu() @ W.double().T
    torch.testing.assert_close(first.double().cpu(), expected, rtol=1.6e-2, atol=1.6e-2 * expected.abs().max().item())


def test_the_op_sends_2_to_16_tokens_here() -> None:
    """The op's rule: one token to the flat GEMV (unless it is off), 2-16 tokens here, more elsewhere; and on
    CUDA, an eager call through the op builds the workspace (a later graph capture then allocates nothing)."""
    from tierprune.kernels.triton import flat_gemv
    from tierprune.kernels.triton.hybrid_mm import hybrid_mm

    assert [md.prefers_mma_decode(T) for T in (1, 2, 16, 17)] == [False, True, True, False]  # without the row kernel
    flat_gemv.use_flat_gemv(False)
    try:
        assert md.prefers_mma_decode(1)
    finally:
        flat_gemv.use_flat_gemv(True)
    md.use_mma_decode(False)
    try:
        assert not any(md.prefers_mma_decode(T) for T in (1, 2, 16))
    finally:
        md.use_mma_decode(True)
    if HAS_CUDA:
        g = torch.Generator().manual_seed(5)
        tier_map = random_tier_map((64, 96), g)
        W = pruned_weight((64, 96), tier_map, g)
        hw = pack_hybrid(W, tier_map).to("cuda")
        x = torch.randn(5, 96, generator=g).to(torch.bfloat16)
        assert not md.mma_decode_ready(hw, 5)
        md.use_rows_decode(False)  # the row kernel takes 2-16 tokens first
        try:
            got = hybrid_mm(x.cuda(), hw)
        finally:
            md.use_rows_decode(True)
        assert md.mma_decode_ready(hw, 5) and md.mma_decode_ready(hw, 8) and not md.mma_decode_ready(hw, 9)
        expected = x.double() @ W.double().T
        torch.testing.assert_close(got.double().cpu(), expected, rtol=1.6e-2, atol=1.6e-2 * expected.abs().max().item())


def test_the_op_sends_decode_to_the_row_kernel_first() -> None:
    """2-16 tokens go to the row kernel; one token (on the CPU, where no block-rows count as few) only where at
    least half of the blocks are dense (else the flat GEMV, unless it is off); nothing when it is turned off. On
    CUDA: the op's result, and a capture after one eager call compiles nothing."""
    from tierprune.kernels.triton import flat_gemv
    from tierprune.kernels.triton.hybrid_mm import hybrid_mm

    g = torch.Generator().manual_seed(9)
    mostly_dense = random_tier_map((64, 96), g, (0.9, 0.1, 0.0))
    mostly_sparse = random_tier_map((64, 96), g, (0.35, 0.45, 0.2))
    dense_hw = pack_hybrid(pruned_weight((64, 96), mostly_dense, g), mostly_dense)
    W = pruned_weight((64, 96), mostly_sparse, g)
    sparse_hw = pack_hybrid(W, mostly_sparse)
    assert [md.prefers_rows_decode(T, sparse_hw) for T in (1, 2, 16, 17)] == [False, True, True, False]
    assert [md.prefers_rows_decode(T, dense_hw) for T in (1, 2, 16, 17)] == [True, True, True, False]
    flat_gemv.use_flat_gemv(False)
    try:
        assert md.prefers_rows_decode(1, sparse_hw)
    finally:
        flat_gemv.use_flat_gemv(True)
    md.use_rows_decode(False)
    try:
        assert not any(md.prefers_rows_decode(T, dense_hw) for T in (1, 2, 16))
    finally:
        md.use_rows_decode(True)
    if HAS_CUDA:
        hw = sparse_hw.to("cuda")
        x = torch.randn(5, 96, generator=g).to(torch.bfloat16).cuda()
        got = hybrid_mm(x, hw)
        assert md.rows_decode_ready(x, hw) and not md.mma_decode_ready(hw, 5)  # no workspace was built
        expected = x.double().cpu() @ W.double().T
        torch.testing.assert_close(got.double().cpu(), expected, rtol=1.6e-2, atol=1.6e-2 * expected.abs().max().item())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = hybrid_mm(x, hw)
        graph.replay()
        torch.testing.assert_close(captured, got, rtol=0, atol=0)


def test_one_token_and_the_config_follow_the_block_rows(monkeypatch) -> None:
    """The config is the first of the ladder whose CTAs, one per block-row, an SM count holds at once (the last
    if none); one token goes to the row kernel whatever the tiers where one does, and mostly sparse weights keep
    the flat GEMV where none does."""
    g = torch.Generator().manual_seed(11)
    tier_map = random_tier_map((384, 96), g, (0.35, 0.45, 0.2))  # 24 block-rows
    hw = pack_hybrid(pruned_weight((384, 96), tier_map, g), tier_map)
    one, two = ([c.config for c in md.ROWS_DECODE_LADDERS[tiles]] for tiles in (1, 2))
    # 24 SMs hold the 24 block-rows at 1 per SM (the first rung of both), 12 at 2 (the first rung of both), 8 at 3
    # (the second rung of both), 6 at 4 (the third), 4 at 8 (one tile) and 7 (two), 2 at 16 and 14; 1 does not
    for sms, at_one, at_two, resident in [(24, one[0], two[0], True),
                                          (12, one[0], two[0], True), (8, one[1], two[1], True),
                                          (6, one[2], two[2], True), (4, one[3], two[3], True),
                                          (2, one[4], two[4], True), (1, one[4], two[4], False)]:
        monkeypatch.setattr(md, "_multiprocessors", lambda device, sms=sms: sms)
        assert md.rows_resident_at_once(hw, hw.device) == resident
        assert md.prefers_rows_decode(1, hw) == resident
        assert [md.rows_decode_config(hw, hw.device, T) for T in (1, 8, 9, 16)] == [at_one, at_one, at_two, at_two], sms
    monkeypatch.undo()
    assert md._multiprocessors(torch.device("cpu")) == 0 and not md.rows_resident_at_once(hw, hw.device)


@pytest.mark.gpu
@needs_cuda
def test_eager_decode_skips_the_op_and_prepares_its_launch_once() -> None:
    """A plain eager decode call goes to the row kernel's prepared launch without the op's dispatch (the profiler
    sees no tierprune::hybrid_mm), builds it once per weight and token count, and gives the op's result; under a
    dispatch mode, or with the row kernel turned off, the call goes through the op again."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tierprune.kernels.triton import hybrid_mm as module

    g = torch.Generator().manual_seed(13)
    tier_map = random_tier_map((64, 96), g)
    W = pruned_weight((64, 96), tier_map, g)
    hw = pack_hybrid(W, tier_map).to("cuda")
    x = torch.randn(1, 3, 96, generator=g).to(torch.bfloat16).cuda()  # (batch, tokens, in) as a model calls it
    expected = (x.double().cpu() @ W.double().T)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        first = module.hybrid_mm(x, hw)
    assert not [e for e in prof.events() if "hybrid_mm" in e.name and "tierprune" in e.name]
    prepared = dict(module._ROWS_DECODE)
    again = module.hybrid_mm(x.clone(), hw)
    assert module._ROWS_DECODE == prepared and any(v is not None for v in prepared.values())
    torch.testing.assert_close(first.double().cpu(), expected, rtol=1.6e-2, atol=1.6e-2 * expected.abs().max().item())
    torch.testing.assert_close(again, first, rtol=0, atol=0)

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    seen: list[str] = []
    with Record():
        module.hybrid_mm(x, hw)
    assert any("tierprune.hybrid_mm" in name or "tierprune::hybrid_mm" in name for name in seen), seen
    md.use_rows_decode(False)
    try:
        torch.testing.assert_close(module.hybrid_mm(x, hw), first, rtol=1.6e-2, atol=1.6e-2 * first.abs().max().item())
    finally:
        md.use_rows_decode(True)


def test_the_kernel_switches_drop_the_prepared_launches() -> None:
    """Which kernel takes a product is cached with its launch; turning the row kernel or the flat GEMV on or off
    must forget those choices."""
    from tierprune.kernels.triton import flat_gemv
    from tierprune.kernels.triton import hybrid_mm as module

    for switch in (md.use_rows_decode, flat_gemv.use_flat_gemv):
        module._ROWS_DECODE[("a product",)] = None
        switch(True)
        assert module._ROWS_DECODE == {}


def test_a_product_the_row_kernel_does_not_take_is_remembered_as_such() -> None:
    """The choice is cached per product (here a CPU one, which the row kernel never takes): one entry, None, for
    two calls; another token count is another product."""
    from tierprune.kernels.triton import hybrid_mm as module

    g = torch.Generator().manual_seed(17)
    tier_map = random_tier_map((64, 96), g)
    hw = pack_hybrid(pruned_weight((64, 96), tier_map, g), tier_map)
    module.forget_prepared_launches()
    x = torch.randn(3, 96, generator=g).to(torch.bfloat16)
    assert module._prepared_rows_decode(x, hw) is None and module._prepared_rows_decode(x.clone(), hw) is None
    assert list(module._ROWS_DECODE.values()) == [None]
    module._prepared_rows_decode(x[:2].contiguous(), hw)
    assert len(module._ROWS_DECODE) == 2
    module.forget_prepared_launches()
