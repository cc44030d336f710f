"""A conversion in a child process, for tests/test_cache.py, which sends it signals.

    python tests/convert_child.py CACHE_DIR [--hold FILE]

Converts a random model of many small arrays (so that orbax's save of it takes a while: 20
layers of 67 arrays). Prints `writing` when it starts writing the checkpoint and `checksum`
when it starts checksumming what orbax wrote, then `converted PATH` (it wrote the checkpoint)
or `found PATH` (another process had). With `--hold FILE` it waits before writing, holding the
checkpoint's lock, until FILE exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import signal
import threading
import time
from pathlib import Path

import jax
import numpy as np

from stagejax.loading import open_model
from stagejax.models import init_params
from stagejax.store import checkpoints
from stagejax.store import convert as convert_module


def many_arrays_handle():
    handle = open_model("tiny")
    config = dataclasses.replace(handle.config, d_model=16, n_layers=20, n_heads=8, n_kv_heads=4,
                                 head_dim=4, ffn_dim=64, vocab_size=300)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda leaf: rng.standard_normal(leaf.shape, dtype=np.float32),
                                    jax.eval_shape(lambda: init_params(config)))
    return dataclasses.replace(handle, name="many", config=config, _read_params=lambda: params)


def main():
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a test that waits too long asks
    # Ctrl-C as in a terminal: a shell without job control starts background commands with
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler (the test's signal
    # would be lost wherever its runner was started that way).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("--hold")
    parser.add_argument("--stall-after-save", action="store_true",
                        help="the writer thread stalls once orbax has written every file, so a "
                             "signal surely arrives while the conversion is unfinished")
    args = parser.parse_args()
    wrote = []
    write, describe = convert_module.write_checkpoint, convert_module._describe_stored

    def write_checkpoint(*a, **k):
        if args.hold:
            while not Path(args.hold).exists():
                time.sleep(0.01)
        print("writing", flush=True)
        wrote.append(True)
        return write(*a, **k)

    def describe_stored(*a, **k):
        if not describe_stored.said:
            print("checksum", flush=True)
            describe_stored.said = True
        return describe(*a, **k)

    describe_stored.said = False
    if args.stall_after_save:
        run_writer = checkpoints.Staging.run_writer

        def stalled(self, write):
            def write_then_stall():
                value = write()
                print("saved", flush=True)
                threading.Event().wait()  # a daemon thread: gone when the process ends
                return value
            return run_writer(self, write_then_stall)

        checkpoints.Staging.run_writer = stalled
    convert_module.write_checkpoint = write_checkpoint
    convert_module._describe_stored = describe_stored
    path = convert_module.convert_checkpoint(many_arrays_handle(), args.cache, ffn_chunks=16,
                                             vocab_chunk=64, progress=False)
    print(f"{'converted' if wrote else 'found'} {path}", flush=True)


if __name__ == "__main__":
    main()
