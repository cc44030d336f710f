"""The device runtime (stagejax_device) against the JAX staged decoder on the same plan: the
exported bundle run by IREE gives the same logits (1e-5 of their scale), the same 32 greedy
tokens and the
same perplexity (1e-4 relative) for each weight format, fixed and budget plans, KV in RAM and on
disk; it installs and runs where JAX cannot be imported; it refuses what it cannot run (a
missing or corrupt module, another checkpoint, another target, a corrupt shard), naming it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stagejax.evaluation import perplexity_llama_cpp
from stagejax.executor import StagedDecoder
from stagejax.engine import plan_context
from stagejax.export import write_bundle
from stagejax.kv_cache import KVLayout
from stagejax.loading import open_model
from stagejax.planner import make_plan
from stagejax.settings import RunSettings, ScheduleSettings
from stagejax.stages import ChunkLayout, build_stages
from stagejax.store import WeightStore, convert_checkpoint
from stagejax_device.bundle import PLAN_FILE, Bundle, BundleError
from stagejax_device.manifest import CheckpointError
from stagejax_device.runner import StagedRunner
from test_planner import DEVICE

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 48  # KV rows: an 8-token prompt, 32 greedy steps, and 2 perplexity windows of 24
PREFILL_BLOCK = 8


@pytest.fixture(scope="module")
def tiny_q4_gguf(tmp_path_factory):
    from test_gguf_import import hf_llama_weights, write_llama_gguf
    from gguf import GGMLQuantizationType as Q

    path = tmp_path_factory.mktemp("gguf") / "tiny-q4_1.gguf"
    write_llama_gguf(path, hf_llama_weights(seed=5, tied=True), Q.Q4_1)
    return path


def staged_decoder(handle, cache_dir, quant, policy, kv_layout, ffn_chunks=2, vocab_chunk=64,
                   budget_mb=None, warm_up=True, context=CONTEXT, prefill_block=PREFILL_BLOCK):
    """The JAX staged decoder of a plan: a fixed policy, or a budget policy planned by the main
    job's planner (with a fixed test device)."""
    path = convert_checkpoint(handle, cache_dir, ffn_chunks, vocab_chunk, quant, progress=False)
    store = WeightStore(path, verify="open")
    manifest = store.manifest
    layout = ChunkLayout(tuple(manifest.ffn_chunk_bounds), tuple(manifest.vocab_chunk_bounds))
    groups = None
    if budget_mb is not None:
        settings = RunSettings(schedule=ScheduleSettings(policy=policy, budget_mb=budget_mb,
                                                         kv_block=kv_layout.block_tokens,
                                                         prefill_block=prefill_block))
        plan_inputs = plan_context(settings, handle.config, layout, store, kv_layout, context, DEVICE)
        groups = make_plan(build_stages(handle.config, layout, manifest.arrays), policy, plan_inputs,
                           int(budget_mb * 2**20)).groups
    decoder = StagedDecoder(handle.config, store, layout, policy, kv_layout, capacity=context,
                            prefill_block=prefill_block, prefetch_depth=2, groups=groups,
                            kv_block=kv_layout.block_tokens, warm_up=warm_up)
    return decoder


def greedy(session, prompt, steps):
    """(tokens, logits per step) of greedy decoding through a session's prefill/step."""
    logits = [np.asarray(session.prefill(prompt))]
    tokens = [int(np.argmax(logits[-1]))]
    for i in range(steps - 1):
        logits.append(np.asarray(session.step(tokens[-1], len(prompt) + i)))
        tokens.append(int(np.argmax(logits[-1])))
    return tokens, logits


CASES = {
    # id: (model, quant, policy, budget MB, KV layout)
    "tiny-none-atomic-disk": ("tiny", "none", "atomic", None, KVLayout("disk", "head_major", 8)),
    "tiny-int8-budget-ram": ("tiny", "int8", "budget", 0.3, KVLayout("ram", "head_major", 8)),
    "q4gguf-native-atomic-ram": ("gguf", "gguf_native", "atomic", None, KVLayout("ram", "head_major", 8)),
    "q4gguf-native-optimal-disk_int8": ("gguf", "gguf_native", "optimal", 0.4,
                                        KVLayout("disk", "token_major", 8, "int8")),
    "gpt2-int8-layer-disk_bf16": ("tiny_gpt2", "int8", "layer", None, KVLayout("disk", "head_major", 8, "bfloat16")),
    "qwen3-int8-op-ram": ("tiny_qwen3", "int8", "op", None, KVLayout("ram", "head_major", 8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_runtime_equals_jax_staged_decoder(case, tmp_path, tiny_q4_gguf):
    model, quant, policy, budget_mb, kv_layout = CASES[case]
    handle = open_model("smollm2_135m", str(tiny_q4_gguf)) if model == "gguf" else open_model(model)
    # Q4_1 blocks are 32 wide: the tiny GGUF's FFN of 160 is cut in 5 chunks
    chunks = (5, 100) if model == "gguf" else (2, 64)
    decoder = staged_decoder(handle, tmp_path / "cache", quant, policy, kv_layout, *chunks, budget_mb=budget_mb)
    try:
        bundle_dir = write_bundle(decoder, tmp_path / "bundle", model_name=model, quant=quant)
        runner = StagedRunner(Bundle.open(bundle_dir), driver="local-sync")
        try:
            rng = np.random.default_rng(7)
            prompt = [int(t) for t in rng.integers(3, handle.config.vocab_size, PREFILL_BLOCK)]
            jax_tokens, jax_logits = greedy(decoder, prompt, 32)
            dev_tokens, dev_logits = greedy(runner, prompt, 32)
            # 1e-5 on logits of order 1: XLA and IREE sum the same products in different orders,
            # and float32 rounding scales with the values (the tiny Q4_1 model's logits reach ~3).
            scale = max(1.0, max(np.abs(a).max() for a in jax_logits))
            worst = max(np.abs(a - b).max() for a, b in zip(jax_logits, dev_logits))
            assert worst <= 1e-5 * scale, (worst, scale)
            assert dev_tokens == jax_tokens
            assert np.abs(jax_logits[0] - jax_logits[-1]).max() > 1e-3  # the steps saw different pasts
            text = [int(t) for t in rng.integers(3, handle.config.vocab_size, 2 * 24)]
            ppl_jax = perplexity_llama_cpp(lambda w: decoder.token_nll(w[0])[None], text, 24, progress=False).ppl
            ppl_dev = perplexity_llama_cpp(lambda w: runner.token_nll(w[0])[None], text, 24, progress=False).ppl
            assert abs(ppl_dev / ppl_jax - 1) <= 1e-4, (ppl_dev, ppl_jax)
            assert runner.module.calls > 0 and runner.store.bytes_read > 0
        finally:
            runner.close()
    finally:
        decoder.close()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    base = tmp_path_factory.mktemp("bundle")
    handle = open_model("tiny")
    # `layer`: few programs, quick to compile twice; nothing runs on the JAX side
    decoder = staged_decoder(handle, base / "cache", "none", "layer", KVLayout("ram", "head_major", 8),
                             warm_up=False)
    try:
        bundle = write_bundle(decoder, base / "tiny", model_name="tiny", quant="none")
        aarch64 = write_bundle(decoder, base / "tiny-aarch64", model_name="tiny", quant="none", target="aarch64")
    finally:
        decoder.close()
    return bundle, aarch64, base / "cache"


def copy_bundle(bundle: Path, to: Path) -> Path:
    shutil.copytree(bundle, to)
    return to


def test_refusals_name_the_problem(tiny_bundle, tmp_path):
    bundle, aarch64, cache = tiny_bundle
    # another target: compiled for aarch64, and this machine is not
    plan = json.loads((aarch64 / PLAN_FILE).read_text())
    assert plan["target"]["arch"] == "aarch64" and "cortex-a76" in " ".join(plan["target"]["flags"])
    if os.uname().machine != "aarch64":
        with pytest.raises(BundleError, match=f"compiled for aarch64 .* this machine is {os.uname().machine}"):
            Bundle.open(aarch64)
    # the module missing, then corrupt
    broken = copy_bundle(bundle, tmp_path / "missing")
    (broken / "module.vmfb").unlink()
    with pytest.raises(BundleError, match="module .*module.vmfb is missing"):
        Bundle.open(broken)
    broken = copy_bundle(bundle, tmp_path / "corrupt")
    data = bytearray((broken / "module.vmfb").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "module.vmfb").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="module .* is corrupt or was replaced"):
        Bundle.open(broken)
    # a plan for another checkpoint: the same model converted with other chunking
    other = convert_checkpoint(open_model("tiny"), cache, 3, 64, "none", progress=False)
    with pytest.raises(BundleError, match="not the one this bundle was planned for"):
        Bundle.open(bundle, checkpoint=other)
    # not a bundle
    with pytest.raises(BundleError, match="not a bundle"):
        Bundle.open(tmp_path)
    # a shard whose bytes changed (same size): its checksum names the array
    checkpoint = copy_bundle(Bundle.open(bundle).checkpoint, tmp_path / "checkpoint")
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    key, info = next((k, v) for k, v in manifest["arrays"].items() if k.startswith("L0/q/0"))
    shard = checkpoint / info["file"]
    data = bytearray(shard.read_bytes())
    data[0] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{key}"):
        StagedRunner(Bundle.open(bundle, checkpoint=checkpoint))
    # the command line says the same, with exit status 2
    completed = subprocess.run([sys.executable, "-m", "stagejax_device", str(broken), "--out", str(tmp_path)],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and "is corrupt or was replaced" in completed.stderr


def test_runtime_installs_and_runs_without_jax(tiny_bundle, tmp_path):
    """A fresh virtual environment with only the runtime's distribution: no jax importable,
    and the bundle decodes the same greedy tokens as the JAX-side runner in this process."""
    bundle, _, _ = tiny_bundle
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              str(REPO / "runtime")], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    probe = subprocess.run([python, "-c", "import jax"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'jax'" in probe.stderr
    out = tmp_path / "out"
    run = subprocess.run([str(venv / "bin" / "stagejax-device"), str(bundle), "--prompt", "Hello, device",
                          "--max-new-tokens", "12", "--out", str(out)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["generated_tokens"] == 12 and metrics["schema_version"] == 2
    assert metrics["decode_peak_rss_bytes"] >= metrics["baseline_rss_bytes"] > 0
    from stagejax_device.tokenizer import Tokenizer

    runner = StagedRunner(Bundle.open(bundle), driver="local-sync")
    try:
        ids = Tokenizer(Bundle.open(bundle).tokenizer_file).encode("Hello, device")
        tokens, _ = greedy(runner, ids, 12)
    finally:
        runner.close()
    assert metrics["generated_ids"] == tokens


SMOLLM2_CASES = [(quant, policy, budget_mb, kv)
                 for quant in ("none", "int8", "gguf_native")
                 for policy, budget_mb, kv in (("atomic", None, KVLayout("ram", "head_major", 64)),
                                               ("budget", 16, KVLayout("disk", "head_major", 64)))]


@pytest.mark.slow
@pytest.mark.parametrize("quant, policy, budget_mb, kv_layout", SMOLLM2_CASES,
                         ids=[f"{q}-{p}-{kv.location}" for q, p, _, kv in SMOLLM2_CASES])
def test_smollm2_runtime_equals_jax_staged_decoder(quant, policy, budget_mb, kv_layout, tmp_path):
    """SmolLM2: logits within 5e-4, the README prompt's 32 greedy tokens identical, perplexity
    (2 chunks of 512 tokens of wiki.test.raw read as bytes) equal to 1e-4 relative."""
    from stagejax.data import read_text

    handle = open_model("smollm2_135m")
    decoder = staged_decoder(handle, None, quant, policy, kv_layout, 8, 512, budget_mb=budget_mb,
                             context=512, prefill_block=64)
    try:
        bundle_dir = write_bundle(decoder, tmp_path / "bundle", model_name="smollm2_135m", quant=quant)
        runner = StagedRunner(Bundle.open(bundle_dir), driver="local-sync")
        try:
            prompt = handle.tokenizer.encode("The capital of France is")
            jax_tokens, jax_logits = greedy(decoder, prompt, 32)
            dev_tokens, dev_logits = greedy(runner, prompt, 32)
            assert max(np.abs(a - b).max() for a, b in zip(jax_logits, dev_logits)) <= 5e-4
            assert dev_tokens == jax_tokens
            text = handle.tokenizer.encode(read_text("wikitext-2/wiki.test.raw"))
            ppl_jax = perplexity_llama_cpp(lambda w: decoder.token_nll(w[0])[None], text, 512, 2, progress=False).ppl
            ppl_dev = perplexity_llama_cpp(lambda w: runner.token_nll(w[0])[None], text, 512, 2, progress=False).ppl
            assert abs(ppl_dev / ppl_jax - 1) <= 1e-4, (ppl_dev, ppl_jax)
        finally:
            runner.close()
    finally:
        decoder.close()
