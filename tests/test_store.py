"""Stage-shard checkpoints: conversion, caching, direct reads, integrity, prefetch.

The tiny presets get random numpy weights of their abstract shapes (every value distinct and
nonzero, biases included), so a mis-sliced or transposed shard cannot compare equal; generating
them this way skips the seconds `init_params` takes to compile.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from stagejax.loading import ModelHandle, open_model
from stagejax.store import (CheckpointError, Manifest, Prefetcher, WeightStore, assemble_params,
                            checkpoint_path, convert_checkpoint, ffn_chunk_bounds,
                            vocab_chunk_bounds)
from stagejax.store import convert as convert_module
from stagejax.store.layout import flatten
from stagejax.tokenizer import Tokenizer

FFN_CHUNKS, VOCAB_CHUNK = 3, 100  # tiny: F 53 -> 18/18/17, V 257 -> 100/100/57 (GPT-2 71, 263)
BLOCK_BYTES = 1024  # small checksum blocks, so tiny arrays span several (tiny embed row: 148 B)


def random_handle(name: str, seed: int = 0) -> ModelHandle:
    """The preset's handle, with random numpy weights instead of `init_params`' (no compile)."""
    handle = open_model(name)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(
        lambda leaf: rng.standard_normal(leaf.shape, dtype=np.float32), handle.abstract_params())
    return dataclasses.replace(handle, _read_params=lambda: params)


def source_params(handle: ModelHandle) -> dict:
    return flatten(jax.tree_util.tree_map(np.asarray, handle._read_params()))


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module", params=["tiny", "tiny_gpt2"])
def converted(request, cache):
    handle = random_handle(request.param)
    path = convert_checkpoint(handle, cache, ffn_chunks=FFN_CHUNKS, vocab_chunk=VOCAB_CHUNK,
                              progress=False, checksum_block_bytes=BLOCK_BYTES)
    return handle, path


@pytest.fixture(scope="module")
def tiny(cache):
    """A tiny checkpoint the integrity tests copy and damage."""
    handle = random_handle("tiny")
    return handle, convert_checkpoint(handle, cache, ffn_chunks=FFN_CHUNKS,
                                      vocab_chunk=VOCAB_CHUNK, progress=False,
                                      checksum_block_bytes=BLOCK_BYTES)


@pytest.fixture
def tiny_copy(tiny, tmp_path):
    import shutil

    handle, path = tiny
    copy = tmp_path / path.name
    shutil.copytree(path, copy)
    return handle, copy


def file_of(path: Path, key: str) -> Path:
    return path / Manifest.read(path).arrays[key].file


# -- layout and round trip --------------------------------------------------------------------


def test_chunk_bounds():
    assert ffn_chunk_bounds(53, 3) == [0, 18, 36, 53]
    assert ffn_chunk_bounds(10, 4) == [0, 3, 6, 8, 10]  # np.array_split: first chunks longer
    assert [len(c) for c in np.array_split(np.arange(10), 4)] == [3, 3, 2, 2]
    assert vocab_chunk_bounds(257, 100) == [0, 100, 200, 257]
    assert vocab_chunk_bounds(257, None) == vocab_chunk_bounds(257, 0) == vocab_chunk_bounds(257, 300) == [0, 257]
    with pytest.raises(ValueError, match="ffn_chunks"):
        ffn_chunk_bounds(53, 54)


def test_shard_keys_and_shapes(converted):
    handle, path = converted
    c = handle.config
    m = Manifest.read(path)
    D, N, K, H = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    gpt2 = c.family == "gpt2"
    assert m.ffn_chunk_bounds == ffn_chunk_bounds(c.ffn_dim, FFN_CHUNKS)
    assert m.vocab_chunk_bounds == vocab_chunk_bounds(c.vocab_size, VOCAB_CHUNK)
    shapes = {key: info.shape for key, info in m.arrays.items()}
    assert list(shapes)[:3] == ["embed/0/w", "embed/1/w", "embed/2/w"]
    assert shapes["embed/2/w"] == (c.vocab_size - 200, D)
    assert shapes[f"L1/q/{N - 1}/w"] == (D, H) and shapes[f"L1/k/{K - 1}/w"] == (D, H)
    assert f"L1/q/{N}/w" not in shapes and f"L1/v/{K}/w" not in shapes
    assert shapes["L2/o/w"] == (N, H, D)
    f0, f1 = m.ffn_chunk_bounds[:2]
    assert shapes["L0/ffn/0/up"] == (D, f1 - f0) and shapes["L0/ffn/0/down"] == (f1 - f0, D)
    assert ("L0/ffn/0/gate" in shapes) != gpt2
    assert ("L0/q/0/b" in shapes) == gpt2 and ("pos_embed/w" in shapes) == gpt2
    if gpt2:
        assert shapes["L0/ffn/1/up_b"] == (f1 - f0,) and shapes["L0/ffn/0/down_b"] == (D,)
        assert "L0/ffn/1/down_b" not in shapes
        assert not any(k.startswith("head/") for k in shapes)  # tied
    else:
        assert shapes["head/2/w"] == (D, c.vocab_size - 200)
    assert list(shapes)[-1] == ("final_norm/b" if gpt2 else "head/2/w")
    assert all(info.dtype == "float32" for info in m.arrays.values())


def test_round_trip_is_bit_exact(converted):
    handle, path = converted
    source = source_params(handle)
    with WeightStore(path, expect_config=handle.config) as store:
        m = store.manifest
        arrays = store.read(m.keys)
        rebuilt = flatten(assemble_params(arrays, handle.config, m.ffn_chunk_bounds, m.vocab_chunk_bounds))
        assert rebuilt.keys() == source.keys()
        for key in source:
            assert bits_equal(rebuilt[key], source[key]), key
        # And shard by shard, against slices of the source taken here.
        src = lambda k: source[k]  # noqa: E731
        v0, v1 = m.vocab_chunk_bounds[1:3]
        f0, f1 = m.ffn_chunk_bounds[1:3]
        assert bits_equal(arrays["embed/1/w"], src("embed/embedding")[v0:v1])
        assert bits_equal(arrays["L2/q/3/w"], np.ascontiguousarray(src("L2/q/kernel")[:, 3, :]))
        assert bits_equal(arrays["L1/v/1/w"], np.ascontiguousarray(src("L1/v/kernel")[:, 1, :]))
        assert bits_equal(arrays["L0/ffn/1/up"], np.ascontiguousarray(src("L0/up/kernel")[:, f0:f1]))
        assert bits_equal(arrays["L0/ffn/1/down"], src("L0/down/kernel")[f0:f1])
        store.release(arrays)
        assert store.resident_bytes == 0


def test_direct_reads_equal_orbax_restore(converted):
    import orbax.checkpoint as ocp

    _, path = converted
    restored = flatten(ocp.PyTreeCheckpointer().restore(path))
    with WeightStore(path) as store:
        arrays = store.read(store.manifest.keys)
        assert restored.keys() == arrays.keys()
        for key, value in arrays.items():
            assert bits_equal(np.asarray(restored[key]), value), key


def test_reads_are_aligned_and_zero_copy_into_jax(converted):
    _, path = converted
    with WeightStore(path) as store:
        arrays = store.read(store.manifest.keys[:8])
        for array in arrays.values():
            assert array.ctypes.data % 64 == 0
            assert array.flags.c_contiguous
        w = arrays["embed/0/w"]
        assert jax.device_put(w).unsafe_buffer_pointer() == w.ctypes.data
        row = store.read_rows("embed/0/w", [7])
        assert row.ctypes.data % 64 == 0
        store.release(arrays)
        store.release(row)


def test_tokenizer_is_rebuilt_from_the_checkpoint(converted):
    handle, path = converted
    tokenizer = Tokenizer.from_checkpoint(Manifest.read(path))
    text = "Stage shards, héllo!"
    assert tokenizer.encode(text) == handle.tokenizer.encode(text)
    assert tokenizer.eos_token_id == handle.tokenizer.eos_token_id


# -- reading ----------------------------------------------------------------------------------


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def bytes_read_by(fn) -> int:
    """rchar consumed by fn() minus what reading /proc/self/io itself adds."""
    a = rchar()
    b = rchar()
    fn()
    c = rchar()
    return (c - b) - (b - a)


@pytest.mark.parametrize("verify", ["off", "read"])
def test_partial_reads_touch_only_the_requested_bytes(tiny, verify):
    _, path = tiny
    with WeightStore(path, verify=verify) as store:
        info = store.manifest.arrays["L1/q/2/w"]
        out = {}
        assert bytes_read_by(lambda: out.update(store.read(["L1/q/2/w"]))) == info.nbytes
        store.release(out)
        embed = store.manifest.arrays["embed/1/w"]
        assert 1 < embed.block_rows < embed.shape[0] % embed.block_rows + embed.block_rows
        rows = []
        n = bytes_read_by(lambda: rows.append(store.read_rows("embed/1/w", [42])))
        # One row; with verify="read", the checksum block holding it.
        assert n == (embed.row_bytes if verify == "off" else embed.block_bytes)
        last = bytes_read_by(lambda: rows.append(store.read_rows("embed/1/w", [99])))
        tail_rows = embed.shape[0] - embed.shape[0] // embed.block_rows * embed.block_rows
        assert last == embed.row_bytes * (1 if verify == "off" else tail_rows)
        embedding = source_params(tiny[0])["embed/embedding"]
        assert bits_equal(rows[0][0], embedding[100 + 42]) and bits_equal(rows[1][0], embedding[199])
        store.release(rows)
        assert store.bytes_read == info.nbytes + n + last


def test_warm_read_rate_reads_every_array_twice_and_leaves_the_counters(tiny):
    _, path = tiny
    with WeightStore(path, verify="off") as store:
        total = store.manifest.nbytes
        rate = []
        assert bytes_read_by(lambda: rate.append(store.warm_read_rate())) == 2 * total
        assert rate[0] > 0 and store.bytes_read == 0 and store.resident_bytes == 0
        one = store.manifest.arrays["L1/q/2/w"].nbytes
        assert bytes_read_by(lambda: store.warm_read_rate(["L1/q/2/w"])) == 2 * one


def test_a_read_verifies_although_another_array_is_corrupt(tiny_copy):
    _, path = tiny_copy
    corrupt(file_of(path, "L2/ffn/0/down"), 17)
    with WeightStore(path, verify="read") as store:
        store.release(store.read(["L2/ffn/0/up", "L1/o/w"]))
        with pytest.raises(CheckpointError, match="L2/ffn/0/down"):
            store.read(["L2/ffn/0/down"])
        assert store.resident_bytes == 0  # the failed read returned its buffer


def test_release_returns_buffers_to_the_pool(tiny):
    _, path = tiny
    with WeightStore(path, verify="off", pool_bytes=2_000) as store:
        small = store.read(["L0/q/0/w"])
        pointer, nbytes = small["L0/q/0/w"].ctypes.data, store.nbytes(["L0/q/0/w"])
        assert store.resident_bytes == nbytes
        store.release(small)
        assert store.resident_bytes == 0 and store.pool_idle_bytes == nbytes
        again = store.read(["L0/q/1/w"])  # same size: the same buffer, reused
        assert again["L0/q/1/w"].ctypes.data == pointer
        store.release(again)
        with pytest.raises(ValueError, match="released twice"):
            store.release(again)
        big = store.read(["L0/o/w"])  # 6 x 10 x 37 floats: over pool_bytes once released
        store.release(big)
        assert store.pool_idle_bytes == nbytes
        assert store.io_wait_s > 0


# -- integrity --------------------------------------------------------------------------------


def corrupt(file: Path, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_corrupt_bytes_are_detected_per_read_and_on_open(tiny_copy):
    _, path = tiny_copy
    key = "L1/ffn/2/gate"
    file = file_of(path, key)
    corrupt(file, 100)
    with WeightStore(path, verify="read") as store:
        with pytest.raises(CheckpointError, match=f"{key}.*{file}.*corrupt"):
            store.read([key])
    with pytest.raises(CheckpointError, match=f"{key}.*{file}.*corrupt"):
        WeightStore(path, verify="open")
    with WeightStore(path, verify="off") as store:  # off trusts the bytes
        store.release(store.read([key]))


def test_a_corrupt_embedding_row_block_is_detected_by_read_rows(tiny_copy):
    _, path = tiny_copy
    info = Manifest.read(path).arrays["embed/0/w"]
    corrupt(path / info.file, info.row_bytes * 3 + 1)  # row 3, in block 0
    with WeightStore(path, verify="read") as store:
        far_row = info.block_rows  # first row of block 1
        store.release(store.read_rows("embed/0/w", [far_row]))
        with pytest.raises(CheckpointError, match="embed/0/w"):
            store.read_rows("embed/0/w", [far_row, 5])


@pytest.mark.parametrize("verify", ["off", "read", "open"])
def test_truncated_chunk_file_is_an_error_naming_array_and_file(tiny_copy, verify):
    _, path = tiny_copy
    file = file_of(path, "L0/o/w")
    os.truncate(file, file.stat().st_size - 4)
    with pytest.raises(CheckpointError, match=f"'L0/o/w'.*{file}.*truncated"):
        WeightStore(path, verify=verify)


def test_missing_array_is_an_error_naming_array_and_file(tiny_copy):
    import shutil

    _, path = tiny_copy
    file = file_of(path, "L2/v/1/w")
    shutil.rmtree(file.parent)
    with pytest.raises(CheckpointError, match=f"'L2/v/1/w' is missing.*{file}"):
        WeightStore(path, verify="off")


def test_checkpoint_of_another_model_is_refused(tiny):
    handle, path = tiny
    other = open_model("tiny_gpt2").config
    with pytest.raises(CheckpointError, match="another model.*family='llama' \\(expected 'gpt2'\\)"):
        WeightStore(path, expect_config=other)
    with pytest.raises(CheckpointError, match="of model 'tiny', expected 'tiny_gpt2'"):
        WeightStore(path, expect_model="tiny_gpt2")
    WeightStore(path, expect_config=handle.config, expect_model="tiny").close()


def test_another_format_version_is_refused(tiny_copy):
    _, path = tiny_copy
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version 99.*reads version 1.*convert"):
        WeightStore(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not a stagejax stage-shard checkpoint"):
        WeightStore(path)


# -- prefetch ---------------------------------------------------------------------------------


def wait_until(condition, timeout_s: float = 60.0) -> None:
    """Poll `condition` until it holds; a deadline far beyond any load, not a timing assumption."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached within the deadline"
        time.sleep(0.0005)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_order_cycles_and_never_exceeds_its_depth(tiny, depth):
    _, path = tiny
    with WeightStore(path, verify="read") as store:
        keys = store.manifest.keys
        units = [keys[i:i + 2] for i in range(0, 24, 2)]
        unit_bytes = sorted((store.nbytes(u) for u in units), reverse=True)
        prefetcher = store.prefetcher(units, depth)
        for step in range(2 * len(units) + 3):  # cycles through the units, in order
            arrays = prefetcher.next()
            assert list(arrays) == list(units[step % len(units)])
            # A slow consumer: the reader runs as far ahead as it may. Waited for (not slept
            # a fixed time), so it holds on a loaded machine too.
            wait_until(lambda: prefetcher.in_flight_units >= depth)
            assert prefetcher.in_flight_units <= depth
            assert prefetcher.in_flight_bytes <= sum(unit_bytes[:depth])
            prefetcher.release(arrays)
        assert prefetcher.max_in_flight_units_seen == depth  # reached (waited for), never exceeded
        assert prefetcher.max_in_flight_bytes_seen <= sum(unit_bytes[:depth])
        deadline = time.monotonic() + 5  # the thread may still be reading its last unit
        while store.resident_bytes != prefetcher.in_flight_bytes and time.monotonic() < deadline:
            time.sleep(0.001)
        assert store.resident_bytes == prefetcher.in_flight_bytes
        prefetcher.close()
        assert store.resident_bytes == 0
        with pytest.raises(ValueError, match="closed"):
            prefetcher.next()


@pytest.mark.parametrize("share_reads", [True, False])
def test_a_waiting_consumer_reads_ahead_itself_in_order_within_the_depth(tiny, share_reads):
    """share_reads: next() reads the next unstarted unit instead of sleeping while the thread
    is slow; units still come in order, with their own bytes, and never more than `depth` ahead."""
    _, path = tiny
    with WeightStore(path, verify="read") as store:
        keys = store.manifest.keys
        units = [keys[i:i + 2] for i in range(0, 24, 2)]
        lent = store.read(keys[:24])
        expected = {k: v.copy() for k, v in lent.items()}
        store.release(lent)
        read_unit = store._read_unit_into

        def slow_in_thread(*args):
            if threading.current_thread().name == "stagejax-prefetch":
                time.sleep(0.01)
            return read_unit(*args)

        store._read_unit_into = slow_in_thread
        prefetcher = Prefetcher(store, units, depth=2, share_reads=share_reads)
        for step in range(2 * len(units)):
            arrays = prefetcher.next()
            assert list(arrays) == list(units[step % len(units)])
            for key, value in arrays.items():
                np.testing.assert_array_equal(value, expected[key])
            assert prefetcher.in_flight_units <= 2
            prefetcher.release(arrays)
        assert prefetcher.max_in_flight_units_seen <= 2
        assert (prefetcher.reads_by_consumer > 0) == share_reads
        prefetcher.close()
        assert store.resident_bytes == 0


def test_prefetch_hands_read_errors_to_the_consumer(tiny_copy):
    _, path = tiny_copy
    corrupt(file_of(path, "L0/k/1/w"), 3)
    with WeightStore(path, verify="read") as store:
        prefetcher = store.prefetcher([["L0/q/0/w"], ["L0/k/1/w"], ["L0/v/0/w"]], depth=2)
        prefetcher.release(prefetcher.next())
        with pytest.raises(CheckpointError, match="L0/k/1/w"):
            prefetcher.next()
        prefetcher.close()
        assert store.resident_bytes == 0


# -- conversion cache -------------------------------------------------------------------------


def test_rerun_finds_the_cached_checkpoint(tiny, cache, monkeypatch):
    handle, path = tiny
    monkeypatch.setattr(convert_module, "write_checkpoint",
                        lambda *a, **k: pytest.fail("converted again"))
    same = dict(ffn_chunks=FFN_CHUNKS, vocab_chunk=VOCAB_CHUNK, checksum_block_bytes=BLOCK_BYTES)
    assert convert_checkpoint(handle, cache, progress=False, **same) == path
    assert checkpoint_path(handle, cache, **same) == path
    assert path.parent == cache / "checkpoints" and path.name.startswith("tiny-none-")
    # Another chunking, another source or another checksum is another checkpoint.
    assert checkpoint_path(handle, cache, **{**same, "ffn_chunks": 2}) != path
    assert checkpoint_path(handle, cache, **{**same, "checksum": "crc32"}) != path
    assert checkpoint_path(handle, cache, **{**same, "checksum_block_bytes": 4096}) != path
    assert checkpoint_path(random_handle("tiny", seed=1), cache, **same) != path
    # vocab_chunk None, 0 and >= V are the same layout, so the same checkpoint.
    assert (checkpoint_path(handle, cache, 1, None) == checkpoint_path(handle, cache, 1, 0)
            == checkpoint_path(handle, cache, 1, 10_000))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("STAGEJAX_CACHE", str(tmp_path))
    assert convert_module.default_cache_dir() == tmp_path
    monkeypatch.delenv("STAGEJAX_CACHE")
    assert convert_module.default_cache_dir() == Path.home() / ".cache" / "stagejax"


def test_a_failed_conversion_leaves_no_directory(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(convert_module, "_describe_stored", fail)  # after orbax has written
    handle = random_handle("tiny_gpt2")
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_checkpoint(handle, tmp_path, progress=False)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_crc32_checkpoint_round_trips(tmp_path):
    handle = random_handle("tiny")
    path = convert_checkpoint(handle, tmp_path, checksum="crc32", progress=False)
    assert Manifest.read(path).conversion["checksum"] == "crc32"
    corrupt(file_of(path, "L0/q/0/w"), 5)
    with WeightStore(path, verify="read") as store:
        store.release(store.read(["L0/q/1/w"]))
        with pytest.raises(CheckpointError, match="L0/q/0/w.*crc32"):
            store.read(["L0/q/0/w"])


def write_hf_llama(directory: Path, config, seed: int = 0) -> dict[str, np.ndarray]:
    """A Hugging Face Llama directory (config.json + model.safetensors) of `config`'s shapes."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    D, N, K, H, F, V = (config.d_model, config.n_heads, config.n_kv_heads, config.head_dim,
                        config.ffn_dim, config.vocab_size)
    w = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    tensors = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": w(D),
               "lm_head.weight": w(V, D)}
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": w(D), p + "post_attention_layernorm.weight": w(D),
                        p + "self_attn.q_proj.weight": w(N * H, D), p + "self_attn.k_proj.weight": w(K * H, D),
                        p + "self_attn.v_proj.weight": w(K * H, D), p + "self_attn.o_proj.weight": w(D, N * H),
                        p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D),
                        p + "mlp.down_proj.weight": w(D, F)})
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": D, "num_attention_heads": N,
        "num_key_value_heads": K, "head_dim": H, "num_hidden_layers": config.n_layers,
        "intermediate_size": F, "vocab_size": V, "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}))
    return tensors


def test_hf_directory_conversion_is_cached_by_content(tmp_path):
    config = open_model("tiny").config
    hf_dir = tmp_path / "hf"
    tensors = write_hf_llama(hf_dir, config)
    handle = open_model("tiny", str(hf_dir))
    assert handle.source_format == "hf"
    path = convert_checkpoint(handle, tmp_path / "cache", ffn_chunks=2, progress=False)
    manifest = Manifest.read(path)
    assert manifest.source["format"] == "hf" and manifest.source["path"] == str(hf_dir)
    with WeightStore(path, expect_config=handle.config) as store:
        arrays = store.read(["L1/ffn/1/down", "head/0/w", "L0/q/2/w"])
        f0 = manifest.ffn_chunk_bounds[1]
        down = tensors["model.layers.1.mlp.down_proj.weight"]  # [D, F]: ours is its transpose
        assert bits_equal(arrays["L1/ffn/1/down"], np.ascontiguousarray(down.T[f0:]))
        assert bits_equal(arrays["head/0/w"], np.ascontiguousarray(tensors["lm_head.weight"].T))
    assert convert_checkpoint(handle, tmp_path / "cache", ffn_chunks=2, progress=False) == path
    # Change one weight file: another source sha256, another checkpoint.
    (hf_dir / "config.json").write_text((hf_dir / "config.json").read_text() + " ")
    assert checkpoint_path(open_model("tiny", str(hf_dir)), tmp_path / "cache", ffn_chunks=2) != path


def test_convert_config_composes():
    from hydra import compose, initialize_config_dir

    from stagejax.convert import to_settings
    from stagejax.store import ConvertSettings

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        settings = to_settings(compose("convert", ["model=tiny", "ffn_chunks=3", "vocab_chunk=100",
                                                   "paths.cache=/tmp/x"]))
        assert isinstance(settings, ConvertSettings)
        assert (settings.model.name, settings.ffn_chunks, settings.vocab_chunk,
                settings.paths.cache, settings.quant.scheme) == ("tiny", 3, 100, "/tmp/x", "none")
        with pytest.raises(ValueError, match="ffn_chunks must be >= 1"):
            to_settings(compose("convert", ["ffn_chunks=0"]))


# -- the real model ---------------------------------------------------------------------------


def test_smollm2_conversion(tmp_path):
    """SmolLM2-135M from the packaged GGUF: every shard bit-exact, tied head, tokenizer kept."""
    from stagejax.importers.gguf import GGUFImportError, packaged_smollm2_gguf

    try:
        gguf_path = packaged_smollm2_gguf()
    except GGUFImportError as e:
        pytest.fail(str(e))  # the default tier requires the packaged GGUF (scripts/setup.sh installs it)
    handle = open_model("smollm2_135m")
    params = jax.tree_util.tree_map(np.asarray, handle.load_params())
    handle = dataclasses.replace(handle, _read_params=lambda: params)  # read the GGUF once
    path = convert_checkpoint(handle, tmp_path, ffn_chunks=2, progress=False)
    manifest = Manifest.read(path)
    assert manifest.source["sha256"] == convert_module._file_sha256(gguf_path)
    assert not any(key.startswith("head/") for key in manifest.arrays)  # tied to embed/0/w
    assert len(manifest.arrays) == 1 + 30 * (2 + 9 + 3 + 3 + 1 + 2 * 3) + 1
    assert Tokenizer.from_checkpoint(manifest).encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    source = flatten(params)
    with WeightStore(path, verify="read", expect_config=handle.config) as store:
        arrays = store.read(manifest.keys)
        rebuilt = flatten(assemble_params(arrays, handle.config, manifest.ffn_chunk_bounds,
                                          manifest.vocab_chunk_bounds))
        for key in source:
            assert bits_equal(rebuilt[key], source[key]), key
