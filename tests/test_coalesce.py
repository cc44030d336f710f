"""Reading consecutive small units together: same arrays, same slab size, fewer reads."""

import numpy as np
import pytest

from stagejax.loading import open_model
from stagejax.stages import ChunkLayout, build_stages
from stagejax.store import WeightStore, convert_checkpoint
from stagejax_device.coalesce import CoalescingPrefetcher, coalesce


def test_coalesce_runs():
    assert coalesce([5, 5, 10, 3, 3, 3, 10], 10) == [(0, 2), (2, 3), (3, 6), (6, 7)]
    assert coalesce([12, 1], 10) == [(0, 1), (1, 2)]  # an oversized unit is a run of its own
    assert coalesce([], 10) == []


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    handle = open_model("tiny")
    path = convert_checkpoint(handle, tmp_path_factory.mktemp("ckpt"), ffn_chunks=3, vocab_chunk=64,
                              progress=False)
    with WeightStore(path, verify="read", expect_config=handle.config) as store:
        layout = ChunkLayout(tuple(store.manifest.ffn_chunk_bounds), tuple(store.manifest.vocab_chunk_bounds))
        units = [list(s.weight_keys) for s in build_stages(handle.config, layout)
                 if s.weight_keys and s.kind != "embed"]
        yield store, units


@pytest.mark.parametrize("depth", [0, 2])
def test_units_come_back_equal_and_in_order(store, depth):
    store, units = store
    expected = [{k: np.array(a) for k, a in store.read(u).items()} for u in units]
    plain = store.prefetcher(units, depth)
    coalesced = CoalescingPrefetcher(store, units, depth)
    try:
        assert coalesced.slab_bytes == plain.slab_bytes  # memory unchanged
        assert len(coalesced.runs) < len(units)  # fewer reads
        for _ in range(2):  # cycles
            for want in expected:
                got = coalesced.next()
                assert got.keys() == want.keys()
                for k in want:
                    np.testing.assert_array_equal(got[k], want[k])
                coalesced.release(got)
        assert coalesced.max_in_flight_units_seen <= depth
        with pytest.raises(ValueError, match="did not hand out"):
            coalesced.release({})
    finally:
        plain.close()
        coalesced.close()
