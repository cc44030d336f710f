"""The KV cache as data: every location × order × block size × dtype stores and reads back
exactly what `ops.kv_roundtrip` says attention sees; int8 stays within its error bound."""

import dataclasses
import itertools
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stagejax.models import ops
from stagejax.activation_store import ActivationStore
from stagejax.kv_cache import HostKVCache, KVLayout, file_system_type, stored_kv
from stagejax.model_config import PRESETS
from stagejax.settings import CacheSettings, RunSettings, ScheduleSettings

CONFIG = PRESETS["tiny"].config
LAYOUTS = [KVLayout(loc, order, block, dtype)
           for loc, order, block, dtype in itertools.product(
               ("ram", "disk"), ("head_major", "token_major"), (4, 8), ops.KV_DTYPES)]


def random_rows(rng, t):
    shape = (t, CONFIG.n_kv_heads, CONFIG.head_dim)
    return (rng.standard_normal(shape).astype(np.float32) * 3,
            rng.standard_normal(shape).astype(np.float32))


def filled_cache(layout, rows=19, read_tokens=8):
    """A cache written like a run writes it: a prefill pass, then single decode rows."""
    rng = np.random.default_rng(0)
    cache = HostKVCache(CONFIG, 24, layout, read_tokens)
    k, v = random_rows(rng, rows)
    cache.write(0, 0, k[:11], v[:11])  # crosses a stored-block boundary
    for r in range(11, rows):
        cache.write(0, r, k[r:r + 1], v[r:r + 1])
    return cache, k, v


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l.location}-{l.order}-b{l.block_tokens}-{l.dtype}")
def test_reads_equal_the_roundtrip(layout):
    cache, k, v = filled_cache(layout)
    rows = k.shape[0]
    expect_k = np.asarray(ops.kv_roundtrip(jnp.asarray(k), layout.dtype))
    expect_v = np.asarray(ops.kv_roundtrip(jnp.asarray(v), layout.dtype))
    if layout.dtype == "float32":
        np.testing.assert_array_equal(expect_k, k)
    try:
        read = jax.jit(stored_kv, static_argnums=(1, 2, 4))
        # Blocks of 8 rows, for every run of groups a head or an op reads.
        for first_group, n_groups in ((0, 1), (1, 1), (CONFIG.n_kv_heads - 1, 1), (0, CONFIG.n_kv_heads)):
            for start in range(0, cache.capacity, 8):
                block = cache.read_block(0, first_group, n_groups, start, 8)
                got_k, got_v = read(block, layout.order, layout.dtype, first_group, n_groups)
                stop = min(start + 8, rows)
                if stop <= start:
                    continue
                groups = slice(first_group, first_group + n_groups)
                np.testing.assert_array_equal(np.asarray(got_k)[:stop - start], expect_k[start:stop, groups])
                np.testing.assert_array_equal(np.asarray(got_v)[:stop - start], expect_v[start:stop, groups])
        past = cache.read_past(0, rows)
        got_k, got_v = read(past, layout.order, layout.dtype, 0, CONFIG.n_kv_heads)
        np.testing.assert_array_equal(np.asarray(got_k)[:rows], expect_k)
        np.testing.assert_array_equal(np.asarray(got_v)[:rows], expect_v)
    finally:
        cache.close()


def test_int8_error_within_bound():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((64, 3, 64)).astype(np.float32) * 5)
    values, scales = ops.kv_quantize(x, "int8")
    assert values.dtype == jnp.int8 and scales.shape == (64, 3)
    err = np.abs(np.asarray(ops.kv_dequantize(values, scales, "int8")) - np.asarray(x))
    bound = np.asarray(scales)[..., None] / 2
    assert np.all(err <= bound * (1 + 1e-6))
    assert err.max() > 0  # lossy: the test could fail
    zeros = ops.kv_roundtrip(jnp.zeros((2, 3, 64)), "int8")
    assert np.all(np.asarray(zeros) == 0)  # an all-zero row: zeros, not NaN


def test_bfloat16_error_within_bound():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((64, 3, 64)).astype(np.float32))
    err = np.abs(np.asarray(ops.kv_roundtrip(x, "bfloat16")) - np.asarray(x))
    assert np.all(err <= np.abs(np.asarray(x)) * 2.0 ** -8)  # 8 significant bits, rounded


def test_disk_reads_fewer_bytes_for_smaller_dtypes():
    read = {}
    for dtype in ops.KV_DTYPES:
        cache, _, _ = filled_cache(KVLayout("disk", "head_major", 8, dtype))
        try:
            cache.read_block(0, 0, 1, 0, 8)
            read[dtype] = cache.bytes_read
        finally:
            cache.close()
    h = CONFIG.head_dim
    assert read["float32"] == 8 * 2 * h * 4
    assert read["bfloat16"] == read["float32"] // 2
    assert read["int8"] == 8 * 2 * (h + 4)  # values + one float32 scale per row


def test_read_size_must_cover_whole_blocks():
    with pytest.raises(ValueError, match="multiple of cache.block_tokens"):
        HostKVCache(CONFIG, 24, KVLayout("disk", "head_major", 8), read_tokens=12)
    with pytest.raises(ValueError, match="multiple of cache.block_tokens"):
        RunSettings(schedule=ScheduleSettings(kv_block=100), cache=CacheSettings(block_tokens=64))
    with pytest.raises(ValueError, match="cache.dtype"):
        CacheSettings(dtype="float8")
    with pytest.raises(ValueError, match="cache.dtype"):
        KVLayout(dtype="float16")


@pytest.mark.parametrize("dtype", ops.KV_DTYPES)
def test_disk_reads_share_one_buffer_as_large_as_the_largest_read(dtype):
    """Reads of every shape land in one buffer per part (values, scales) kept between reads:
    what stays resident is the largest read, which the plan charges to every group."""
    layout = KVLayout("disk", "head_major", 4, dtype)
    cache, k, v = filled_cache(layout)
    try:
        small = cache.read_block(0, 0, 1, 0, 8)
        largest = sum(part.nbytes for part in small)
        assert cache.resident_bytes() == largest
        whole = cache.read_past(0, k.shape[0])
        largest = max(largest, sum(part.nbytes for part in whole))
        assert cache.resident_bytes() == largest
        again = cache.read_block(0, 1, 1, 8, 8)  # a smaller read after a larger one: no new buffer
        assert cache.resident_bytes() == largest
        expect_k = np.asarray(ops.kv_roundtrip(jnp.asarray(k), dtype))
        got_k, _ = stored_kv(again, layout.order, layout.dtype, 1, 1)
        np.testing.assert_array_equal(np.asarray(got_k), expect_k[8:16, 1:2])
    finally:
        cache.close()


# ---- files of a disk cache --------------------------------------------------------------------

DISK = KVLayout("disk", "head_major", 8, "int8")


def test_disk_cache_files_have_no_name(tmp_path):
    """Files are unnamed while open (O_TMPFILE, or unlinked at once), so a killed run leaves
    nothing in the directory; reads still give back what was written."""
    scratch = tmp_path / "scratch"
    cache, k, v = filled_cache(dataclasses.replace(DISK, directory=str(scratch)))
    try:
        assert list(scratch.iterdir()) == []
        values = cache.read_block(0, 0, CONFIG.n_kv_heads, 0, 8)[0]
        assert np.abs(values).sum() > 0
    finally:
        cache.close()
    store = ActivationStore(str(scratch))
    try:
        store.write(("x",), np.arange(5, dtype=np.float32))
        np.testing.assert_array_equal(store.read(("x",)), np.arange(5, dtype=np.float32))
        assert list(scratch.iterdir()) == []
    finally:
        store.close()


@pytest.mark.skipif(file_system_type("/dev/shm") != "tmpfs", reason="no tmpfs at /dev/shm")
def test_a_cache_on_tmpfs_says_it_is_in_ram(tmp_path):
    directory = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        with pytest.warns(RuntimeWarning, match=f"{directory}, which is on tmpfs: that is RAM"):
            HostKVCache(CONFIG, 24, dataclasses.replace(DISK, directory=str(directory))).close()
    finally:
        directory.rmdir()


KILLED_DECODE = """
import sys, time
import numpy as np
from stagejax.activation_store import ActivationStore
from stagejax.kv_cache import HostKVCache, KVLayout
from stagejax.model_config import PRESETS
config = PRESETS["tiny"].config
cache = HostKVCache(config, 64, KVLayout("disk", "head_major", 8, "int8", sys.argv[1]))
rows = np.ones((5, config.n_kv_heads, config.head_dim), np.float32)
cache.write(0, 0, rows, rows)
ActivationStore(sys.argv[1]).write(("x",), rows)
print("decoding", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGKILL,)], ids=["term", "kill"])
def test_a_killed_decode_leaves_no_files(tmp_path, signals):
    """SLURM ends a job with SIGTERM, then SIGKILL: either way no KV or activation file stays."""
    scratch = tmp_path / "scratch"
    child = subprocess.Popen([sys.executable, "-c", KILLED_DECODE, str(scratch)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "decoding"
        for sig in signals:
            child.send_signal(sig)
        assert child.wait(timeout=60) == -signals[-1]
    finally:
        child.kill()
    assert list(scratch.iterdir()) == []
