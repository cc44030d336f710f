"""The GIL-free weight reader (stagejax_device/native_stream.py): same units, same bytes, same
depth and memory rules as the Python prefetch thread; errors name the array; chosen by `reader`."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

from stagejax.loading import open_model
from stagejax.store import CheckpointError, Manifest, WeightStore, convert_checkpoint
from stagejax_device import native_stream
from stagejax_device.coalesce import CoalescingPrefetcher
from stagejax_device.native_stream import NativePrefetcher, make_prefetcher
from stagejax_device.weight_store import Prefetcher


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    handle = open_model("tiny")
    return convert_checkpoint(handle, tmp_path_factory.mktemp("ckpt"), ffn_chunks=3, vocab_chunk=100,
                              progress=False)


def units_of(store):
    keys = store.manifest.keys
    return [keys[i:i + 2] for i in range(0, 24, 2)]


def test_the_reader_compiles_where_a_c_compiler_exists():
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine: runs use the Python prefetch thread")
    assert native_stream.library() is not None, native_stream.library_error()


def wait_until(condition, timeout_s: float = 60.0) -> None:
    """Poll `condition` until it holds; a deadline far beyond any load, not a timing assumption."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached within the deadline"
        time.sleep(0.0005)


@pytest.mark.parametrize("depth", [1, 3])
def test_units_cycle_in_order_with_their_bytes_within_the_depth(checkpoint, depth):
    with WeightStore(checkpoint, verify="open") as store:
        units = units_of(store)
        lent = store.read([k for u in units for k in u])
        expected = {k: v.copy() for k, v in lent.items()}
        store.release(lent)
        unit_bytes = sorted((store.nbytes(u) for u in units), reverse=True)
        before = store.bytes_read
        prefetcher = NativePrefetcher(store, units, depth)
        for step in range(2 * len(units) + 3):
            arrays = prefetcher.next()
            assert list(arrays) == list(units[step % len(units)])
            for key, value in arrays.items():
                np.testing.assert_array_equal(value, expected[key])
                assert value.ctypes.data % 64 == 0  # zero-copy into JAX
            # A slow consumer: the reader runs as far ahead as it may. Waited for (not slept
            # a fixed time), so it holds on a loaded machine too.
            wait_until(lambda: prefetcher.in_flight_units >= depth)
            assert prefetcher.in_flight_units <= depth
            assert prefetcher.in_flight_bytes <= sum(unit_bytes[:depth])
            prefetcher.release(arrays)
        assert prefetcher.max_in_flight_units_seen == depth  # reached (waited for), never exceeded
        assert prefetcher.max_in_flight_bytes_seen <= sum(unit_bytes[:depth])
        assert store.resident_bytes == 0  # lent bytes come back at release
        assert store.bytes_read - before == sum(store.nbytes(units[s % len(units)])
                                       for s in range(2 * len(units) + 3))
        with pytest.raises(ValueError, match="did not hand out"):
            prefetcher.release({})
        prefetcher.close()
        with pytest.raises(ValueError, match="closed"):
            prefetcher.next()


def test_a_waiting_consumer_reads_every_unit_itself_when_the_thread_does_not(checkpoint, monkeypatch):
    """Shared reads: with the background loop idle, next() reads its units itself, in order."""
    monkeypatch.setattr(NativePrefetcher, "_run", lambda self: None)
    with WeightStore(checkpoint, verify="open") as store:
        units = units_of(store)
        expected = {k: v.copy() for k, v in store.read([k for u in units for k in u]).items()}
        with NativePrefetcher(store, units, depth=2) as prefetcher:
            for step in range(len(units) + 2):
                arrays = prefetcher.next()
                for key, value in arrays.items():
                    np.testing.assert_array_equal(value, expected[key])
                prefetcher.release(arrays)
            assert prefetcher.reads_by_consumer == len(units) + 2
            assert prefetcher.max_in_flight_units_seen <= 2


def test_a_file_truncated_after_opening_is_an_error_naming_the_array(checkpoint, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    with WeightStore(copy, verify="open") as store:
        units = [["L0/q/0/w"], ["L0/k/1/w"], ["L0/v/0/w"]]
        prefetcher = NativePrefetcher(store, units, depth=1)
        prefetcher.release(prefetcher.next())
        os.truncate(copy / Manifest.read(copy).arrays["L0/k/1/w"].file, 10)
        with pytest.raises(CheckpointError, match=r"L0/k/1/w.*truncated.*convert again"):
            for _ in range(6):  # the unit may have been read ahead before the truncation
                prefetcher.release(prefetcher.next())
        prefetcher.close()


def test_the_reader_setting_picks_the_prefetcher(checkpoint):
    with WeightStore(checkpoint, verify="open") as store:
        units = units_of(store)
        native = native_stream.library() is not None
        auto = make_prefetcher(store, units, 2)
        assert isinstance(auto, NativePrefetcher if native else Prefetcher)
        assert isinstance(make_prefetcher(store, units, 2, "python"), Prefetcher)
        assert isinstance(make_prefetcher(store, units, 0), Prefetcher)  # depth 0: no thread
        assert CoalescingPrefetcher(store, units, 2, "python").reader == "python"
        with pytest.raises(ValueError, match="store.reader must be one of"):
            make_prefetcher(store, units, 2, "fast")
        with pytest.raises(ValueError, match="prefetch_depth >= 1"):
            make_prefetcher(store, units, 0, "native")
    with WeightStore(checkpoint, verify="read") as store:  # per-read checksums are Python's
        assert isinstance(make_prefetcher(store, units_of(store), 2), Prefetcher)
        with pytest.raises(ValueError, match="verify other than 'read'"):
            make_prefetcher(store, units_of(store), 2, "native")


def test_closing_the_store_stops_its_readers(checkpoint):
    store = WeightStore(checkpoint, verify="open")
    prefetcher = NativePrefetcher(store, units_of(store), 2)
    prefetcher.release(prefetcher.next())
    store.close()
    assert prefetcher._thread is None
    with pytest.raises(ValueError, match="closed"):
        prefetcher.next()
