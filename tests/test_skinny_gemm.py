"""The skinny-GEMM kernels' host-side choices (the kernels themselves need CUDA: bench/skinny_gemm_bench.py checks
them against torch on the GPU, and bench/decode_floor.py checks the decode layers against the cuBLAS path)."""
import json

from services.worker import skinny_gemm
from services.worker.skinny_gemm import (SHARED_MEMORY_BYTES, TUNED_CONFIGS, TileConfig, block_m_for, config_for, fit,
                                         shared_memory, skinny_gemm_fits)


def test_rows_pad_to_a_tensor_core_tile():
    assert [block_m_for(m) for m in (1, 5, 16, 17, 33)] == [16, 16, 16, 32, 64]


def test_fit_splits_k_into_whole_chunks_within_shared_memory():
    # SmolLM2's hidden size 576 = 9 x 64: a 256-wide chunk does not divide it
    assert fit(TileConfig(16, 32, 256, 4, 4), 576).block_k == 64
    big = TileConfig(16, 128, 512, 8, 5)            # 4 stages in flight x (16 + 2 x 128) x 512 x 2 bytes: too much
    assert shared_memory(big, w_tiles=2) > SHARED_MEMORY_BYTES
    fitted = fit(big, 4096, w_tiles=2)
    assert shared_memory(fitted, w_tiles=2) <= SHARED_MEMORY_BYTES and 4096 % fitted.block_k == 0
    assert fit(TileConfig(16, 32, 256, 4, 4), 4096) == TileConfig(16, 32, 256, 4, 4)   # a fitting one is kept


def test_inner_sizes_must_be_whole_tensor_core_chunks():
    assert skinny_gemm_fits(4096, 14336, 576)
    assert not skinny_gemm_fits(4096, 100)


def test_split_k_tiles_are_fitted_to_whole_slices_of_k():
    """Each program of a split-K tile reads K / split_k columns in chunks of block_k: a split that does not cut K into
    whole 16-wide slices is halved (down to no split), then the chunks are narrowed to divide a slice."""
    assert fit(TileConfig(16, 64, 256, 4, 4, 2), 4096) == TileConfig(16, 64, 256, 4, 4, 2)
    assert fit(TileConfig(16, 64, 256, 4, 4, 4), 14336).split_k == 4          # 3584 = 14 x 256
    assert fit(TileConfig(16, 64, 256, 4, 4, 3), 4096).split_k == 1           # 4096 / 3 is no whole slice
    assert fit(TileConfig(16, 64, 256, 4, 4, 8), 96).split_k == 2             # 96 / 8 = 12 and 96 / 4 = 24: not 16-wide
    assert fit(TileConfig(16, 32, 256, 4, 4, 4), 576) == TileConfig(16, 32, 16, 4, 4, 4)   # 144-wide slices
    assert TileConfig(16, 32, 256, 4, 4).split_k == 1                          # four-number tiles do not split


def test_committed_tuned_configs_are_well_formed_and_fit():
    table = json.loads(TUNED_CONFIGS.read_text())
    assert table, "no tuned device"
    for device, shapes in table.items():
        for shape, by_rows in shapes.items():
            n, k = map(int, shape.split("x"))
            for rows, tiles in by_rows.items():
                cfg = TileConfig(int(rows), *tiles)          # [block_n, block_k, warps, stages(, split_k)]
                assert len(tiles) in (4, 5) and all(isinstance(t, int) and t > 0 for t in tiles), (device, shape)
                assert fit(cfg, k) == cfg, (device, shape, cfg)   # whole K slices and chunks: used as tuned, not cut
                assert shared_memory(cfg) <= SHARED_MEMORY_BYTES, (device, shape, cfg)   # SiLU's 2nd tile: fit()


def test_tuned_tiles_are_used_on_their_device_and_the_default_elsewhere():
    device, shapes = next(iter(json.loads(TUNED_CONFIGS.read_text()).items()))
    shape, by_rows = next(iter(shapes.items()))
    n, k = map(int, shape.split("x"))
    assert config_for(1, n, k, device) == TileConfig(16, *by_rows["16"])
    assert config_for(1, n, k, "some other GPU") == skinny_gemm.default_config(1, n, k)


def test_decode_layers_use_the_kernel_only_as_far_as_tiles_were_tuned():
    llama_8b = [(6144, 4096), (4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]
    assert skinny_gemm.tuned_rows("NVIDIA H200", llama_8b) == skinny_gemm.LAYER_ROWS == 32
    assert skinny_gemm.tuned_rows("NVIDIA A100-SXM4-80GB", llama_8b) == 0          # never tuned there: cuBLAS
    assert skinny_gemm.tuned_rows("NVIDIA H200", llama_8b[:4] + [(151936, 4096)]) == 0   # another vocabulary
