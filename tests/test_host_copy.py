"""The packed host-to-device copy: values and shapes survive, and every view starts on a 16-byte boundary
(Triton compiles a kernel variant per pointer alignment; unaligned views made the first serving run compile)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.worker.host_copy import ALIGN_BYTES, to_device

sizes = st.lists(st.integers(min_value=0, max_value=37), min_size=1, max_size=9)


def _offset_bytes(t: torch.Tensor) -> int:
    return t.data_ptr() - t.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float32])
@settings(max_examples=60, deadline=None)
@given(lengths=sizes)
def test_views_keep_values_and_start_on_16_bytes(dtype, lengths):
    rng = np.random.default_rng(sum(lengths))
    arrays = [rng.integers(-1000, 1000, n).astype(dtype) for n in lengths]
    out = to_device(torch.device("cpu"), *arrays)
    for a, t in zip(arrays, out):
        assert t.shape == a.shape
        assert np.array_equal(t.numpy(), a)
        assert _offset_bytes(t) % ALIGN_BYTES == 0, f"view at byte {_offset_bytes(t)}"


def test_two_dimensional_arrays_keep_their_shape():
    rows = np.arange(12, dtype=np.int64).reshape(3, 4)
    first, table = to_device(torch.device("cpu"), np.array([7], np.int64), rows)
    assert first.tolist() == [7]
    assert table.tolist() == rows.tolist()
    assert _offset_bytes(table) % ALIGN_BYTES == 0
