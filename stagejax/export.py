"""Exporting a plan to a device bundle: StableHLO compiled by IREE (design §9).

`export_bundle(settings)` plans the run exactly as the main job would (same policy, budget,
chunking, KV layout), builds the executor's `Program`s — the one per-group description the JAX
executor also compiles — serialises every distinct one with `jax.export`, merges them into one
StableHLO module (one function per program) and compiles it with IREE for the target. The
bundle directory holds:

  module.vmfb      every program, plus the sampler, the sampling keys and (lossy KV dtypes) the
                   KV quantizer, compiled for the target;
  plan.json        `BUNDLE_FORMAT` version; the target; the checkpoint (directory, sha256 of its
                   manifest); the model config; the KV layout; per function its flattened
                   inputs and outputs (argument paths, shapes, dtypes); per group, in execution
                   order, its kind, weight keys, per-call constants, KV layers read and flushed,
                   activation entries and the function of each pass kind;
  tokenizer.npz    the model's tokenizer in the runtime's compact form (chat template and
                   special ids in plan.json);
  weights/         with `self_contained`: a copy of the stage shards.

The device runtime (`stagejax_device`, no JAX) runs it. This module is the only importer of
`iree.compiler`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from stagejax.models import ops
from stagejax.devices import device_from_settings
from stagejax.executor import Program, StagedDecoder
from stagejax.engine import plan_context
from stagejax.kv_cache import KVLayout
from stagejax.loading import open_model
from stagejax.planner import make_plan
from stagejax.sampling import SamplingConfig
from stagejax.settings import RunSettings
from stagejax.stages import ChunkLayout, build_stages
from stagejax.store import WeightStore, convert_checkpoint
from stagejax_device.bundle import (BUNDLE_FORMAT, MODULE_FILE, MODULE_NAME, PLAN_FILE, TARGETS,
                                    TOKENIZER_FILE, WEIGHTS_DIR, manifest_sha256)
from stagejax_device.tokenizer import compile_tokenizer
from stagejax_device.manifest import MANIFEST_FILE
from stagejax_device.results import atomic_write_json


def _path_keys(path) -> list:
    """A pytree key path as JSON: dict keys as strings, sequence indices as ints."""
    keys = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            keys.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.SequenceKey):
            keys.append(int(entry.idx))
        else:
            raise TypeError(f"unexpected pytree key {entry!r} in an exported signature")
    return keys


def _leaves(tree) -> list[dict]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [{"path": _path_keys(path), "shape": list(leaf.shape), "dtype": np.dtype(leaf.dtype).name}
            for path, leaf in leaves]


def describe(program: Program) -> dict:
    """The flattened call of an exported program: the order IREE takes its arguments in and
    returns its results in (jax.export flattens pytrees the same way)."""
    outputs = jax.eval_shape(program.fn, *program.specs)
    inputs = _leaves(tuple(program.specs))
    for leaf in inputs:  # a donated argument's buffer may become a result's: never lend it
        leaf["donated"] = leaf["path"][0] in program.donate_argnums
    return {"inputs": inputs, "outputs": _leaves(outputs)}


def extra_programs(decoder: StagedDecoder, kv_layout: KVLayout, capacity: int) -> list[Program]:
    """What the runtime needs beside the groups: the sampler, the sampling keys of a seed, and
    the KV quantizer of a lossy dtype (one per pass length)."""
    programs = [decoder.sampler,
                Program("sampling_keys", lambda seed: jax.random.split(jax.random.PRNGKey(seed), capacity),
                        (jax.ShapeDtypeStruct((), jnp.uint32),))]
    if kv_layout.dtype != "float32":
        config = decoder.config
        for tokens in sorted({1, decoder.prefill_block}):
            spec = jax.ShapeDtypeStruct((tokens, config.n_kv_heads, config.head_dim), jnp.float32)
            programs.append(Program(
                f"kv_quantize_t{tokens}",
                lambda k, v: ops.kv_quantize(jnp.stack([k, v], axis=1), kv_layout.dtype), (spec, spec)))
    return programs


def merged_stablehlo(programs: list[Program]) -> str:
    """One StableHLO module holding every program as a public function named after it (private
    helpers prefixed with it, so nothing collides)."""
    from iree.compiler import ir

    context = ir.Context()
    merged = None
    for program in programs:
        text = jax.export.export(program.jit())(*program.specs).mlir_module()
        module = ir.Module.parse(text, context)
        names = [ir.StringAttr(op.attributes["sym_name"]).value for op in module.body.operations]
        for name in names:
            new = program.name if name == "main" else f"{program.name}__{name}"
            ir.SymbolTable.replace_all_symbol_uses(name, new, module.operation)
        for op in module.body.operations:
            name = ir.StringAttr(op.attributes["sym_name"]).value
            op.attributes["sym_name"] = ir.StringAttr.get(
                program.name if name == "main" else f"{program.name}__{name}", context)
        if merged is None:
            merged = module
            continue
        for op in list(module.body.operations):
            op.detach_from_parent()
            merged.body.append(op)
    merged.operation.attributes["sym_name"] = ir.StringAttr.get(MODULE_NAME, context)
    return merged.operation.get_asm(enable_debug_info=False)


def compile_module(stablehlo: str, target: str) -> bytes:
    """IREE's llvm-cpu compilation of the merged module for `target` (TARGETS)."""
    import iree.compiler

    flags = TARGETS[target]["flags"]
    return iree.compiler.compile_str(stablehlo, input_type="stablehlo", target_backends=["llvm-cpu"],
                                     extra_args=list(flags))


def target_record(target: str) -> dict:
    """What plan.json says of the target: architecture, IREE flags, and for `host` the CPU
    features the code may use (the runtime refuses a machine lacking one)."""
    record = {"name": target, "arch": TARGETS[target]["arch"], "flags": list(TARGETS[target]["flags"])}
    if target == "host":
        record["arch"] = platform.machine()
        record["cpu_flags"] = _cpu_flags()
    return record


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return sorted(set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def group_records(decoder: StagedDecoder, names: dict[int, str]) -> list[dict]:
    """Per group, in execution order, what the runtime's loop needs (the executor's wiring)."""
    records = []
    for gi, group in enumerate(decoder.groups):
        functions = {}
        for (index, tokens, scoring), executable in decoder._group_exe.items():
            if index != gi:
                continue
            key = f"{tokens}/{'score' if scoring else 'gen'}"
            functions[key] = ({mode: names[id(e)] for mode, e in executable.items()}
                              if isinstance(executable, dict) else names[id(executable)])
        written, read_only = group.state_entries(False)
        s_written, s_read_only = group.state_entries(True)
        records.append({
            "id": group.id, "kind": group.kind, "weight_keys": list(group.weight_keys),
            "index": [int(v) for v in np.asarray(decoder._index[gi])],
            "first_head": int(group.stages[0].index), "n_heads": len(group.stages),
            "layer": group.stages[0].layer, "kv_layers": list(group.kv_layers),
            "flush_layers": list(decoder.flush_points.get(gi, ())),
            "entries": {"gen": [list(written), list(read_only)],
                        "score": [list(s_written), list(s_read_only)]},
            "functions": functions})
    return records


def state_records(decoder: StagedDecoder) -> dict:
    """Initial activation state per pass kind: entry -> shape, dtype, fill."""
    from stagejax.stages import init_state

    states = {}
    for tokens, scoring in decoder.pass_kinds():
        state = jax.eval_shape(lambda: init_state(decoder.config, tokens, scoring))
        states[f"{tokens}/{'score' if scoring else 'gen'}"] = {
            entry: {"shape": list(spec.shape), "dtype": np.dtype(spec.dtype).name,
                    "fill": float(ops.MASK_VALUE) if entry == "nll_m" else 0.0}
            for entry, spec in state.items()}
    return states


def default_bundle_dir(settings: RunSettings) -> Path:
    from stagejax.data import REPO_ROOT

    cache = settings.cache.kind + {"float32": "", "bfloat16": "_bf16", "int8": "_int8"}[settings.cache.dtype]
    name = f"{settings.model.name}-{settings.schedule.policy}-{settings.quant.scheme}-{cache}-{settings.export.target}"
    return REPO_ROOT / "outputs" / "bundles" / name


def export_bundle(settings: RunSettings, progress: bool = True) -> Path:
    """Plan the configured run as the main job would, export every program and write the
    bundle; returns its directory."""
    export = settings.export
    if settings.schedule.policy == "model":
        raise ValueError("schedule=model keeps every weight resident in one executable; the device "
                         "runtime runs staged plans: choose atomic, op, layer or a budget policy")
    if settings.schedule.activations != "ram":
        raise ValueError("the device runtime keeps activations in its own buffers: export with "
                         "schedule.activations=ram")
    out = Path(export.out).expanduser().resolve() if export.out else default_bundle_dir(settings)
    handle = open_model(settings.model.name, settings.model.path, settings.seed)
    config = handle.config
    if export.context > config.max_seq_len:
        raise ValueError(f"export.context={export.context} exceeds the model's context of {config.max_seq_len}")
    checkpoint = convert_checkpoint(handle, settings.paths.cache, settings.schedule.ffn_chunks,
                                    settings.schedule.vocab_chunk, settings.quant.scheme, progress=progress)
    schedule, cache = settings.schedule, settings.cache
    kv_layout = KVLayout(cache.kind, cache.order, cache.block_tokens or schedule.kv_block, cache.dtype)
    sampling = SamplingConfig(settings.decode.temperature, settings.decode.top_k, settings.decode.top_p)
    with WeightStore(checkpoint, verify="off", expect_config=config) as store:
        manifest = store.manifest
        layout = ChunkLayout(tuple(manifest.ffn_chunk_bounds), tuple(manifest.vocab_chunk_bounds))
        device = device_from_settings(settings.device, settings.paths.cache)
        context = plan_context(settings, config, layout, store, kv_layout, export.context, device)
        budget = None if schedule.budget_mb is None else int(schedule.budget_mb * 2**20)
        planned = make_plan(build_stages(config, layout, manifest.arrays), schedule.policy, context, budget)
        decoder = StagedDecoder(config, store, layout, schedule.policy, kv_layout, capacity=export.context,
                                prefill_block=schedule.prefill_block, prefetch_depth=schedule.prefetch_depth,
                                sampling=sampling, groups=planned.groups, kv_block=schedule.kv_block,
                                warm_up=False)
        try:
            return write_bundle(decoder, out, model_name=settings.model.name, quant=settings.quant.scheme,
                                target=export.target, self_contained=export.self_contained,
                                planned_peak_bytes=max(row.peak_bytes for row in planned.rows),
                                budget_mb=schedule.budget_mb, progress=progress)
        finally:
            decoder.close()


def write_bundle(decoder: StagedDecoder, out: str | Path, *, model_name: str, quant: str,
                 target: str = "host", self_contained: bool = False,
                 planned_peak_bytes: int | None = None, budget_mb: float | None = None,
                 progress: bool = False) -> Path:
    """Export `decoder`'s programs (the ones it runs) and its wiring as a bundle at `out`."""
    started = time.perf_counter()
    out = Path(out)
    config, store = decoder.config, decoder.store
    manifest, checkpoint = store.manifest, store.path
    kv_layout = decoder.kv_layout
    programs = list(decoder.programs.values()) + extra_programs(decoder, kv_layout, decoder.cache.capacity)
    names = {id(decoder._executables[sig]): program.name for sig, program in decoder.programs.items()}
    groups = group_records(decoder, names)
    if progress:
        print(f"export: {len(programs)} functions for {len(groups)} groups; compiling with IREE "
              f"for {target}", flush=True)
    export_start = time.perf_counter()
    stablehlo = merged_stablehlo(programs)
    lowered_s = time.perf_counter() - export_start
    vmfb = compile_module(stablehlo, target)
    compile_s = time.perf_counter() - export_start - lowered_s
    tokenizer_info = manifest.tokenizer_info
    plan = {
        "format": BUNDLE_FORMAT["name"], "version": BUNDLE_FORMAT["version"],
        "target": target_record(target),
        "module": {"file": MODULE_FILE, "sha256": hashlib.sha256(vmfb).hexdigest(), "bytes": len(vmfb)},
        "checkpoint": {"path": WEIGHTS_DIR if self_contained else str(checkpoint),
                       "manifest_sha256": manifest_sha256(checkpoint), "model_name": manifest.model_name},
        "model": {"name": model_name, "config": config.to_dict()},
        "tokenizer": None if tokenizer_info is None else {
            "file": tokenizer_info["file"], "bos_token_id": tokenizer_info["bos_token_id"],
            "eos_token_id": tokenizer_info["eos_token_id"], "add_bos": tokenizer_info["add_bos"],
            "chat_template": tokenizer_info["chat_template"]},
        "schedule": {"policy": decoder.policy, "budget_mb": budget_mb,
                     "prefill_block": decoder.prefill_block, "prefetch_depth": decoder.prefetch_depth,
                     "planned_peak_bytes": (planned_peak_bytes if planned_peak_bytes is not None
                                            else max(row.peak_bytes for row in decoder.plan())),
                     "n_stages": len(decoder.stages), "n_groups": len(groups)},
        "quant": quant,
        "kv": {"location": kv_layout.location, "order": kv_layout.order, "block_tokens": kv_layout.block_tokens,
               "dtype": kv_layout.dtype, "read_tokens": decoder.kv_block, "capacity": decoder.cache.capacity},
        "vocab_bounds": list(decoder.layout.vocab_bounds), "ffn_bounds": list(decoder.layout.ffn_bounds),
        "embed_leaves": list(decoder._embed_leaves),
        "sampling": dataclasses.asdict(decoder.sampling),
        "states": state_records(decoder),
        "functions": {program.name: describe(program) for program in programs},
        "groups": groups,
        "exported": {"jax": jax.__version__, "seconds_lower": round(lowered_s, 2),
                     "seconds_compile": round(compile_s, 2),
                     "seconds_total": round(time.perf_counter() - started, 2)},
    }
    _write_bundle(out, plan, vmfb, checkpoint, self_contained)
    if progress:
        print(f"export: bundle {out} (module {len(vmfb) / 2**20:.1f} MiB, {compile_s:.1f} s to compile)")
    return out


def _write_bundle(out: Path, plan: dict, vmfb: bytes, checkpoint: Path, self_contained: bool) -> None:
    """Write into a temporary directory beside `out`, then swap it in: an interrupted export
    leaves the previous bundle (or none), never half of one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a bundle is for everyone to read
    try:
        (tmp / MODULE_FILE).write_bytes(vmfb)
        if plan["tokenizer"] is not None:
            info = plan["tokenizer"]
            compile_tokenizer(checkpoint / info["file"], tmp / TOKENIZER_FILE, info["bos_token_id"],
                              info["eos_token_id"], info["add_bos"])
        if self_contained:
            shutil.copytree(checkpoint, tmp / WEIGHTS_DIR)
            if not (tmp / WEIGHTS_DIR / MANIFEST_FILE).exists():
                raise RuntimeError(f"copying {checkpoint} into the bundle lost its {MANIFEST_FILE}")
        atomic_write_json(tmp / PLAN_FILE, plan)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


if __name__ == "__main__":
    from stagejax.run import export_main

    export_main()
