"""The Triton attention kernels' launch plumbing, checked without compiling anything: the grid layout,
the autotuning buckets and the per-head-dim tile lists of kernels/_attention_tiles.py (whose compiled
resource use tests/test_triton_compile.py checks)."""
import pytest
import torch

pytest.importorskip("triton")
from kernels import _attention_tiles as tiles  # noqa: E402
from kernels import flash_attention as fa  # noqa: E402

BLOCK_DS = (16, 32, 64, 128, 256)


def _grid(T, BH, block):
    grid = fa._grid(T, BH, block, {block: 16})
    return grid if isinstance(grid, tuple) else grid({block: 16})


def test_batch_times_heads_is_on_grid_axis_0():
    """CUDA caps grid axes 1 and 2 at 65,535 blocks; axis 0 takes 2^31 - 1, so B*H = 70,000 launches."""
    assert _grid(1, 70_000, "BLOCK_M") == (70_000, 1)
    assert _grid(1024, 4, "BLOCK_N") == (4, 64)


def test_decoding_is_tuned_once_and_no_run_tunes_more_than_eleven_times():
    q = torch.empty(1, 1, 1, 64, device="meta")
    decode = {fa._meta(q, torch.empty(1, 1, Tk, 64, device="meta"))["TUNE_TQ"] for Tk in range(1, 70_000, 97)}
    assert decode == {16}, "every decoding step (Tq = 1, Tk growing) must share one tuning key"
    buckets = {fa._tune_bucket(T) for T in [*range(1, 20_000), 65_535, 10**6, 3 * 10**6]}
    assert buckets == {2**i for i in range(4, 15)}  # 16 .. 16384: at most 11 tunings per kernel, D, dtype


@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
def test_every_launch_finds_its_tile_list(kernel):
    universe = {tiles._key(c) for c in tiles.configs(kernel)}
    assert len(universe) == len(tiles.configs(kernel)), "the autotuner gets each config once"
    for kind in ("16bit", "tf32", "ieee"):
        for block_d in BLOCK_DS:
            listed = tiles.TILES[kernel][kind][block_d]
            assert listed and set(listed) <= universe, (kind, block_d)


@pytest.mark.parametrize("dtype,prec,kind", [(torch.float16, "ieee", "16bit"), (torch.bfloat16, "ieee", "16bit"),
                                             (torch.float32, "tf32", "tf32"), (torch.float32, "ieee", "ieee")])
def test_the_pruner_hands_the_autotuner_this_launchs_list(dtype, prec, kind):
    q = torch.empty(1, 1, 8, 8, dtype=dtype, device="meta")
    prune = tiles.pruner("fwd", "TUNE_TQ")
    for block_d in BLOCK_DS:
        train = prune(tiles.configs("fwd"), {"Q": q, "TUNE_TQ": 1024}, BLOCK_D=block_d, PREC=prec)
        assert [tiles._key(c) for c in train] == tiles.TILES["fwd"][kind][block_d]
        decode = prune(tiles.configs("fwd"), {"Q": q, "TUNE_TQ": 16}, BLOCK_D=block_d, PREC=prec)
        assert [tiles._key(c) for c in decode] == tiles.DECODE_TILES[kind][block_d]
        assert all(c.kwargs["BLOCK_M"] == 16 for c in decode), "decoding tiles have 16 query rows"


def test_grouped_query_dkdv_skips_only_its_listed_configs():
    """A GQA dK/dV launch (GQA=True) gets the multi-head list less GQA_DKDV_SKIP, and always keeps some."""
    prune = tiles.pruner("dkdv", "TUNE_TK")
    for dtype, prec, kind in [(torch.float16, "ieee", "16bit"), (torch.float32, "tf32", "tf32"),
                              (torch.float32, "ieee", "ieee")]:
        q = torch.empty(1, 1, 8, 8, dtype=dtype, device="meta")
        for block_d in BLOCK_DS:
            nargs = {"Q": q, "TUNE_TK": 1024}
            mha = [tiles._key(c) for c in prune(tiles.configs("dkdv"), nargs, BLOCK_D=block_d, PREC=prec, GQA=False)]
            gqa = [tiles._key(c) for c in prune(tiles.configs("dkdv"), nargs, BLOCK_D=block_d, PREC=prec, GQA=True)]
            skip = tiles.GQA_DKDV_SKIP.get(kind, {}).get(block_d, [])
            assert mha == tiles.TILES["dkdv"][kind][block_d]
            assert gqa == [c for c in mha if c not in skip] and gqa, (kind, block_d)
            assert set(skip) <= set(mha), "a skipped config must be one the list has"


def test_on_a_gpu_the_pruner_drops_the_configs_that_spill_or_do_not_fit_there():
    """The real resource use decides: each listed config is compiled for the launch on the device, and
    one that spills or needs more shared memory than the GPU has is not benchmarked (said once)."""
    from triton.runtime.autotuner import OutOfResources

    class Compiled:
        def __init__(self, spills):
            self.n_spills = spills

        def _init_handles(self):
            pass

    class Kernel:  # stands in for the JIT function: what it would report on some GPU
        arg_names = ["Q", "TUNE_TQ"]

        def warmup(self, *args, grid, **kw):
            if (kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"]) == (128, 64, 8):
                raise OutOfResources(300_000, 232_448, "shared memory")
            return Compiled(16 if kw["num_stages"] == 3 else 0)

    class CudaQ:
        is_cuda = True

        def element_size(self):
            return 2

    prune = tiles.pruner("fwd", "TUNE_TQ", Kernel())
    nargs = {"Q": CudaQ(), "TUNE_TQ": 1024}
    with pytest.warns(UserWarning, match="spills 16 B of registers on this GPU"):
        kept = [tiles._key(c) for c in prune(tiles.configs("fwd"), nargs, BLOCK_D=64, PREC="ieee")]
    listed = tiles.TILES["fwd"]["16bit"][64]
    assert kept == [c for c in listed if c[3] != 3 and c[:3] != (128, 64, 8)]
    assert kept, "the test must leave something to keep"


def test_no_query_tile_exceeds_max_block_m():
    """MAX_BLOCK_M is the documented reach of a non-finite value into earlier rows (kernels/reference.py):
    every forward and dq tile, decoding ones included, keeps to it."""
    from kernels._attention_tiles import DECODE_TILES, MAX_BLOCK_M, TILES
    tables = [TILES["fwd"], TILES["dq"], DECODE_TILES]
    rows = {c[0] for t in tables for by_d in t.values() for cs in by_d.values() for c in cs}
    assert rows and max(rows) <= MAX_BLOCK_M, rows
