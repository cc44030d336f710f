"""Running an exported plan with IREE: the staged decoder of `stagejax.executor`, without JAX.

The loop is the JAX executor's (`StagedDecoder.run_pass`), driven by the bundle's plan instead of
Python objects: per group, in order, take its weights from the prefetcher (the same GIL-free
reader over the same stage shards), read its KV past or blocks from the host cache, call the
group's IREE function with the activation state, keep what it writes, give the weights back,
and write the new KV rows after the layer's last k/v stage. Activations stay IREE device
arrays between calls; weights and KV blocks are passed as host arrays (copied in by IREE).

`StagedRunner.prefill / step / sample / token_nll` is the session protocol of the JAX side, so
generation and perplexity follow the same procedures.
"""

from __future__ import annotations

import time
import types
from typing import Sequence

import ml_dtypes
import numpy as np

from stagejax_device.bundle import Bundle, BundleError
from stagejax_device.coalesce import CoalescingPrefetcher
from stagejax_device.kv_store import HostKVCache, KVLayout, aligned_empty
from stagejax_device.weight_store import WeightStore, ZeroWeights

_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _dtype(name: str) -> np.dtype:
    return _DTYPES.get(name) or np.dtype(name)


def _get(tree, path: Sequence):
    for key in path:
        tree = tree[key]
    return tree


def _build(paths: list[list], values: Sequence):
    """The nested dicts / tuples of a flattened result (jax.export's order)."""
    if len(paths) == 1 and not paths[0]:
        return values[0]
    root: dict = {}
    for path, value in zip(paths, values):
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    def freeze(node):
        if not isinstance(node, dict):
            return node
        if all(isinstance(k, int) for k in node):
            return tuple(freeze(node[i]) for i in range(len(node)))
        return {k: freeze(v) for k, v in node.items()}

    return freeze(root)


# Lending host arrays to IREE without a copy gave wrong logits now and then with the C weight
# reader running beside the calls (not with the Python reader): until that race is understood,
# every host array is copied in.
LEND_HOST_ARRAYS = False


class IreeModule:
    """The bundle's module loaded into an IREE context (memory-mapped, not copied), called
    through the VM directly: arguments pushed as buffer views, results kept as buffer views.

    A host array that is 64-byte aligned and C-contiguous — every weight the reader hands out,
    every KV block and activation buffer — is imported without a copy (IREE's heap buffers must
    be aligned so); anything else (a scalar) is copied in. IREE's Python function wrapper
    converted and copied every argument on every call: ~90 µs of a SmolLM2 group call here.
    """

    def __init__(self, bundle: Bundle, driver: str = "local-sync"):
        import iree.runtime as rt

        self._rt = rt
        self.config = rt.Config(driver)
        self.device = self.config.device
        self._allocator = self.device.allocator
        vm_module = rt.VmModule.mmap(self.config.vm_instance, str(bundle.module_file))
        self.context = rt.SystemContext(config=self.config)
        self.context.add_vm_module(vm_module)
        self._vm_context = self.context.vm_context
        self.signatures = bundle.plan["functions"]
        self._functions = {}
        for name, signature in self.signatures.items():
            function = vm_module.lookup_function(name)
            if function is None:
                raise BundleError(f"the bundle's module has no function {name!r}: export it again")
            inputs = [(tuple(leaf["path"]), tuple(leaf["shape"]), _dtype(leaf["dtype"]),
                       _element_type(rt, leaf["dtype"]), leaf.get("donated", True))
                      for leaf in signature["inputs"]]
            outputs = [leaf["path"] for leaf in signature["outputs"]]
            self._functions[name] = (function, inputs, outputs)
        self._memory = rt.MemoryType.HOST_LOCAL | rt.MemoryType.DEVICE_VISIBLE
        self._usage = rt.BufferUsage.DEFAULT
        self.calls = 0

    def view(self, value, shape, dtype, element_type, donated: bool = True):
        """A buffer view of `value` (returned as is if it is one already). A host array is lent
        to IREE without a copy only when the call does not take it over (`donated`): IREE may
        write a result into a donated buffer, or free it as its own."""
        rt = self._rt
        if isinstance(value, rt.HalBufferView):
            return value
        array = value if isinstance(value, np.ndarray) and value.dtype == dtype else np.asarray(value, dtype)
        if LEND_HOST_ARRAYS and not donated and array.ctypes.data % 64 == 0 and array.flags.c_contiguous \
                and array.nbytes:
            buffer = self._allocator.import_host_allocation(array, self._memory, self._usage)
            return rt.HalBufferView(buffer, list(shape), element_type)
        buffer = self._allocator.allocate_buffer_copy(memory_type=self._memory, allowed_usage=self._usage,
                                                      device=self.device, buffer=np.ascontiguousarray(array))
        return rt.HalBufferView(buffer, list(shape), element_type)

    def call(self, name: str, args: tuple):
        """Call function `name` with structured `args` (as the JAX program took them: host
        arrays, numbers or buffer views); returns its structured result as buffer views."""
        rt = self._rt
        function, inputs, outputs = self._functions[name]
        arguments = rt.VmVariantList(len(inputs))
        for path, shape, dtype, element_type, donated in inputs:
            value = args
            for key in path:
                value = value[key]
            arguments.push_ref(self.view(value, shape, dtype, element_type, donated))
        results = rt.VmVariantList(len(outputs))
        self._vm_context.invoke(function, arguments, results)
        self.calls += 1
        return _build(outputs, [results.get_as_object(i, rt.HalBufferView) for i in range(len(outputs))])


def host(value) -> np.ndarray:
    """A host copy of a result (a buffer view) or of an array."""
    if isinstance(value, np.ndarray):
        return value
    mapped = value.map()
    return np.array(mapped.asarray(tuple(value.shape), _view_dtype(value)))


_ELEMENT_TYPE_NAMES = {"float32": "FLOAT_32", "int32": "SINT_32", "uint32": "UINT_32", "int8": "SINT_8",
                       "uint8": "UINT_8", "bfloat16": "BFLOAT_16", "float16": "FLOAT_16", "int64": "SINT_64",
                       "bool": "BOOL_8", "uint16": "UINT_16", "int16": "SINT_16"}


def _element_type(rt, dtype: str):
    return getattr(rt.HalElementType, _ELEMENT_TYPE_NAMES[dtype])


# Results may come back as signless integers (IREE's "int" element types)
_SIGNLESS = {"INT_8": "int8", "INT_16": "int16", "INT_32": "int32", "INT_64": "int64"}


def _view_dtype(view) -> np.dtype:
    import iree.runtime as rt

    names = list(_ELEMENT_TYPE_NAMES.items()) + [(dtype, member) for member, dtype in _SIGNLESS.items()]
    for name, member in names:
        if int(view.element_type) == int(getattr(rt.HalElementType, member)):
            return _dtype(name)
    raise TypeError(f"no numpy dtype for IREE element type {view.element_type}")


class StagedRunner:
    """Staged prefill, decode steps and scoring of a bundle's plan on IREE.

    Args:
      bundle: an opened `Bundle`.
      driver: IREE's HAL driver ("local-sync": inline; "local-task": a thread pool, ~9x slower
        per call for these small dispatches).
      verify: checksums of the stage shards ("open": every block once now, "read", "off").
      reader: the weight reader ("auto" | "native" | "python"), as `store.reader`.
      kv_directory: where a disk KV cache keeps its files (default: a temporary directory).
    """

    def __init__(self, bundle: Bundle, driver: str = "local-sync", verify: str = "open",
                 reader: str = "auto", kv_directory: str | None = None):
        plan = self.plan = bundle.plan
        self.config = types.SimpleNamespace(**plan["model"]["config"])
        self.module = IreeModule(bundle, driver)
        self.store = WeightStore(bundle.checkpoint, verify=verify, expect_config=plan["model"]["config"],
                                 expect_model=plan["checkpoint"]["model_name"])
        try:
            kv = plan["kv"]
            layout = KVLayout(kv["location"], kv["order"], kv["block_tokens"], kv["dtype"], kv_directory)
            quantize = None if kv["dtype"] == "float32" else self._quantize
            self.cache = HostKVCache(self.config, kv["capacity"], layout, kv["read_tokens"], quantize)
            self.kv_block = kv["read_tokens"]
            self.groups = plan["groups"]
            self.prefill_block = plan["schedule"]["prefill_block"]
            units = [g["weight_keys"] for g in self.groups if g["kind"] != "embed" and g["weight_keys"]]
            self.prefetcher = CoalescingPrefetcher(self.store, units, plan["schedule"]["prefetch_depth"], reader)
        except BaseException:
            self.store.close()
            raise
        self.vocab_bounds = plan["vocab_bounds"]
        # A family with learned positions stores their rows; the embed group adds them.
        self.position_rows = "pos_embed/w" in self.store.manifest.arrays
        self.embed_leaves = plan["embed_leaves"]
        self._embed_rows: dict[int, tuple] = {}
        self.kv_wait_s = 0.0

    # ---- pieces ------------------------------------------------------------------------------

    def _quantize(self, k_TKH: np.ndarray, v_TKH: np.ndarray):
        stored = self.module.call(f"kv_quantize_t{k_TKH.shape[0]}", (k_TKH, v_TKH))
        # (values, scales); a float dtype's scales are None, which a flattened result drops
        return host(stored[0]), (host(stored[1]) if len(stored) > 1 else None)

    def _state(self, tokens: int, scoring: bool) -> dict:
        key = f"{tokens}/{'score' if scoring else 'gen'}"
        return {entry: np.full(spec["shape"], spec["fill"], _dtype(spec["dtype"]))
                for entry, spec in self.plan["states"][key].items()}

    def _vocab_chunk_of(self, token: int) -> int:
        for c in range(len(self.vocab_bounds) - 1):
            if token < self.vocab_bounds[c + 1]:
                return c
        raise ValueError(f"token id {token} is outside the vocabulary of {self.vocab_bounds[-1]}")

    def _read_embed(self, token_ids: np.ndarray, start: int) -> tuple:
        tokens = len(token_ids)
        if tokens not in self._embed_rows:
            arrays = self.store.manifest.arrays
            buffers = tuple(aligned_empty((tokens,) + tuple(arrays[f"embed/0/{leaf}"].shape[1:]),
                                     arrays[f"embed/0/{leaf}"].dtype) for leaf in self.embed_leaves)
            if self.position_rows:
                buffers += (aligned_empty((tokens, self.config.d_model), "float32"),)
            self._embed_rows[tokens] = buffers
        buffers = self._embed_rows[tokens]
        for t, token in enumerate(token_ids):
            c = self._vocab_chunk_of(int(token))
            for leaf, buffer in zip(self.embed_leaves, buffers):
                row = self.store.read_rows(f"embed/{c}/{leaf}", [int(token) - self.vocab_bounds[c]])
                buffer[t] = row[0]
                self.store.release(row)
        if self.position_rows:
            positions = np.minimum(np.arange(start, start + tokens), self.config.max_seq_len - 1)
            rows = self.store.read_rows("pos_embed/w", positions.tolist())
            buffers[-1][:] = rows
            self.store.release(rows)
        return buffers

    # ---- one pass over every group ----------------------------------------------------------

    def run_pass(self, token_ids: Sequence[int], start: int, n_real: int,
                 targets: Sequence[int] | None = None) -> dict:
        """Every group once for tokens at positions [start, start + T); returns the final state
        (generation: "logits" of the last real token; scoring: the NLL accumulators)."""
        tokens = len(token_ids)
        scoring = targets is not None
        if start + tokens > self.cache.capacity:
            raise ValueError(f"positions up to {start + tokens} exceed the bundle's KV capacity of "
                             f"{self.cache.capacity} rows (export.context)")
        mode = f"{tokens}/{'score' if scoring else 'gen'}"
        token_ids = np.asarray(token_ids, np.int32)
        ctx = {"positions": np.arange(start, start + tokens, dtype=np.int32)[None],
               "past_len": np.int32(start), "last": np.int32(n_real - 1)}
        if scoring:
            ctx["targets"] = np.asarray(targets, np.int32)
        state = self._state(tokens, scoring)
        call = self.module.call
        for group in self.groups:
            function = group["functions"][mode]
            written, read_only = group["entries"]["score" if scoring else "gen"]
            index = np.asarray(group["index"], np.int32)
            kind = group["kind"]
            if kind == "embed":
                rows = self._read_embed(token_ids, start)
                state.update(call(function, ({e: state[e] for e in written}, {}, rows, ctx, index, ())))
            elif kind == "attn_blocks":
                self._run_attention(group, function, state, ctx, start)
            else:
                weights = self.prefetcher.next() if group["weight_keys"] else None
                past = ()
                if group["kv_layers"]:
                    kv_start = time.perf_counter()
                    past = tuple(self.cache.read_past(layer, start) for layer in group["kv_layers"])
                    self.kv_wait_s += time.perf_counter() - kv_start
                out = call(function, ({e: state[e] for e in written}, {e: state[e] for e in read_only},
                                      tuple(weights[k] for k in group["weight_keys"]) if weights else (),
                                      ctx, index, past))
                state.update(out)
                if weights is not None:  # IREE copied them in: the slab can be reused
                    self.prefetcher.release(weights)
            for layer in group["flush_layers"]:
                self.cache.write(layer, start, host(state["k_new"])[0], host(state["v_new"])[0])
        return state

    def _run_attention(self, group: dict, functions: dict, state: dict, ctx: dict, start: int) -> None:
        config = self.config
        n_heads = group["n_heads"]
        g = config.n_heads // config.n_kv_heads
        n_groups = 1 if n_heads == 1 else n_heads // g
        first_head = group["first_head"]
        first_group = first_head // g
        if self.cache.layout.order == "token_major":
            first_group, n_groups = 0, config.n_kv_heads  # blocks carry every group
        const = {e: state[e] for e in ("q", "k_new", "v_new")}
        n_blocks = max(1, -(-start // self.kv_block))
        layer = group["layer"]
        head = np.int32(first_head)
        read = self.cache.read_block
        kv_start = time.perf_counter()
        block = read(layer, first_group, n_groups, 0, self.kv_block)
        self.kv_wait_s += time.perf_counter() - kv_start
        if n_blocks == 1:
            state["attn"] = self.module.call(functions["only"], (state["attn"], const, block, ctx, head))
            return
        carry = self.module.call(functions["first"], (const, block, ctx, head))
        attn = state["attn"]
        for b in range(1, n_blocks):
            kv_start = time.perf_counter()
            block = read(layer, first_group, n_groups, b * self.kv_block, self.kv_block)
            self.kv_wait_s += time.perf_counter() - kv_start
            last = b == n_blocks - 1
            attn, carry = self.module.call(functions["last" if last else "middle"],
                                           (attn, carry, const, block, ctx, head, np.int32(b * self.kv_block)))
        state["attn"] = attn

    def dry_run(self) -> None:
        """One prefill pass and one decode step on zero weights, before any weight is read:
        first-use costs (IREE's executables loaded, buffers allocated) are the runtime's, so the
        baseline is measured after them, as the JAX executor's dry run does. The KV rows written
        are overwritten or masked later."""
        units = [g["weight_keys"] for g in self.groups if g["kind"] != "embed" and g["weight_keys"]]
        zeros = ZeroWeights(self.store.manifest, units)
        store, prefetcher = self.store, self.prefetcher
        self.store, self.prefetcher = zeros, zeros
        try:
            self.run_pass([0] * self.prefill_block, 0, 1)
            self.step(0, 1)
        finally:
            self.store, self.prefetcher = store, prefetcher
            self.cache.bytes_read = self.cache.bytes_written = 0
            self.kv_wait_s = 0.0

    # ---- the session protocol ---------------------------------------------------------------

    def prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """Run the prompt in passes of `prefill_block` tokens; the last token's logits [V]."""
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ValueError("the prompt is empty: give it some text")
        state = None
        for start in range(0, len(prompt_ids), self.prefill_block):
            chunk = prompt_ids[start:start + self.prefill_block]
            state = self.run_pass(chunk + [0] * (self.prefill_block - len(chunk)), start, len(chunk))
        return host(state["logits"])

    def step(self, token: int, position: int):
        return host(self.run_pass([token], position, 1)["logits"])

    def sample(self, logits, key) -> int:
        return int(host(self.module.call("sample", (logits, np.asarray(key, np.uint32)))))

    def sampling_keys(self, seed: int) -> np.ndarray:
        """One PRNG key per position ([capacity, 2] uint32), as `jax.random.split` gives them."""
        return host(self.module.call("sampling_keys", (np.uint32(seed),)))

    def token_nll(self, window: Sequence[int]) -> np.ndarray:
        """NLL of window[1:] given their prefixes, through the staged path: [len(window) - 1]."""
        window = list(window)
        nll = []
        for start in range(0, len(window) - 1, self.prefill_block):
            chunk = window[start:start + self.prefill_block]
            targets = window[start + 1:start + 1 + self.prefill_block]
            n_real = len(targets)
            state = self.run_pass(chunk + [0] * (self.prefill_block - len(chunk)), start, len(chunk),
                                  targets + [0] * (self.prefill_block - n_real))
            m, s, target = (host(state[e]).astype(np.float32) for e in ("nll_m", "nll_s", "nll_target"))
            nll.append((m + np.log(s) - target)[:n_real])
        return np.concatenate(nll)

    def release_pass_buffers(self, keep_tokens: int = 1) -> None:
        for key in [k for k in self._embed_rows if k != keep_tokens]:
            del self._embed_rows[key]

    def close(self) -> None:
        self.prefetcher.close()
        self.cache.close()
        self.store.close()
