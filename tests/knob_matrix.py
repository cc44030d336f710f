"""The knob matrix: every setting a user turns for a staged run, combined all-pairs, and the
checker that holds each combination to the monolithic model.

Importable (tests put `tests/` on the path): a new family adds an entry to `FAMILY_CONFIGS`
(and a GGUF writer branch if its importer differs); a new knob or value adds to `KNOBS`, and to
`REFUSALS` if the project refuses some of its combinations. `pairwise_cases()` regenerates the
cases; test ids name every knob value (`Case.id`).

Models. The matrix's tiny models break the prime-size convention of `model/tiny*` on purpose:
every input dimension a quantization group reads (d_model, n_heads * head_dim, each FFN chunk)
is a multiple of 64, so every scheme, `int4_g64` included, accepts them. The other axes stay
distinct where the importer allows (vocabulary 263, context 67, Llama: 4 heads of 32 over 2 kv
heads, N * H = 128, FFN 192 in 3 chunks) so most transposed axes still fail. Weights are drawn with a gain per matrix (`scaled_params`) so attention is
far from uniform (a uniform attention hides position and kv-group errors). Each family's
weights are written once as a GGUF file (matrices as Q4_1 blocks, the embedding as Q8_0, as the
packaged SmolLM2 is), so `gguf_native` has a source; every other scheme converts the same file's
float32 weights.

Contract (`check_case`): on the same stored (quantized) weights and the same KV dtype, a staged
run's prefill logits, >= 8 decode steps' logits and the NLL of a scored window equal the
monolithic model's full forward within `ATOL`, and its greedy tokens are the monolithic greedy
tokens (a deep model with a lossy cache: within its own sensitivity, tokens compared where that
decides them; `MatrixModel.tolerance`). Combinations the project refuses must raise the documented error instead (`REFUSALS`).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from pathlib import Path
from typing import Callable

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from allpairspy import AllPairs

from stagejax.models import ops
from stagejax.decode import forward_logits
from stagejax.devices import device_from_settings
from stagejax.engine import ScheduleRun, plan_context
from stagejax.importers.gguf import _byte_to_unicode, gpt2_placements, llama_placements
from stagejax.kv_cache import KVLayout
from stagejax.loading import open_model
from stagejax.model_config import ModelConfig
from stagejax.models import init_params
from stagejax.planner import make_plan
from stagejax.sampling import SamplingConfig
from stagejax.settings import (CacheSettings, DeviceSettings, PathSettings, QuantSettings,
                               RunSettings, ScheduleSettings, StoreSettings)
from stagejax.stages import ChunkLayout, build_stages
from stagejax.store import WeightStore, convert_checkpoint
from stagejax.store.layout import assemble_params

Q = gguf.GGMLQuantizationType

# float32 logits of the tiny models agree to ~1e-6 (online softmax and chunked sums reassociate
# float32 additions; logits here reach ~10); the staged path must stay inside 1e-5.
ATOL = 1e-5
# A lossy KV dtype (bfloat16, int8) rounds each key and value the two paths compute; where
# float32 reassociation puts one on the other side of a rounding boundary, the two caches hold
# it one step apart (2^-8 relative for bfloat16, max|row| / 127 for int8) and the logits move by
# that step's effect, not by float32 rounding (measured over the matrix: up to 4.7e-5, against
# <= 6e-6 with float32 caches).
LOSSY_FACTOR = 50


def lossy_atol(atol: float) -> float:
    return LOSSY_FACTOR * atol


# Every knob a user sets for a staged run, with the values the matrix covers. Order matters
# only for the id. `kv_block` is schedule.kv_block (rows per attention call), `block_tokens`
# cache.block_tokens (rows per stored block).
KNOBS: dict[str, tuple] = {
    "schedule": ("atomic", "op", "layer", "budget", "similar_size", "optimal"),
    "quant": ("none", "int8", "int4_g32", "int4_g64", "int4_g32_asym", "gguf_native"),
    "cache": ("ram", "disk", "disk_bf16", "disk_int8"),
    "order": ("head_major", "token_major"),
    "block_tokens": (4, 8),
    "kv_block": (8, 16),
    "activations": ("ram", "disk"),
    "depth": (0, 1, 3),
    "reader": ("native", "python"),
    "family": ("llama", "gpt2", "qwen3"),
}

# Combinations the project refuses, each with the error a user meets (type, message pattern).
# A predicate sees a (possibly partial) dict of knob values.
REFUSALS: list[tuple[Callable[[dict], bool], type, str]] = [
    (lambda k: k.get("reader") == "native" and k.get("depth") == 0, ValueError,
     r"store\.reader=native needs schedule\.prefetch_depth >= 1"),
]

CACHE_OPTIONS = {"ram": ("ram", "float32"), "disk": ("disk", "float32"),
                 "disk_bf16": ("disk", "bfloat16"), "disk_int8": ("disk", "int8")}

FFN_CHUNKS = 3  # FFN 192 -> chunks of 64: whole groups of 64 and GGUF blocks of 32
VOCAB_CHUNK = 100  # 263 -> chunks of 100, 100, 63: two head signatures
PREFILL_BLOCK = 8  # the 13-token prompt: one full pass and one padded pass
PROMPT_TOKENS = 13
NEW_TOKENS = 10  # greedy tokens: the prefill gives the first, 9 decode steps the rest
NLL_WINDOW = 17  # 16 scored tokens: two scoring passes
BUDGET_POLICIES = ("budget", "similar_size", "optimal")
# Compiling is most of a case's time; its executables compile on every core at once (the
# compiled code, hence the logits, is the same as compiled one after another).
COMPILE_WORKERS = os.cpu_count() or 1

# Vocabulary of the tiny GGUF files: 3 control tokens, the 256 byte symbols, 4 merges = 263.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n"]
TOKENS = SPECIALS + [_byte_to_unicode()[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "in"]

NORM_EPS = float(np.float32(1e-5))  # as a GGUF file stores it

FAMILY_CONFIGS: dict[str, ModelConfig] = {
    "llama": ModelConfig(family="llama", vocab_size=len(TOKENS), d_model=64, n_layers=2,
                         n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=192, max_seq_len=67,
                         norm_eps=NORM_EPS, rope_theta=10000.0, tie_embeddings=False,
                         bos_token_id=1, eos_token_id=0),
    "gpt2": ModelConfig(family="gpt2", vocab_size=len(TOKENS), d_model=64, n_layers=2,
                        n_heads=4, n_kv_heads=4, head_dim=16, ffn_dim=192, max_seq_len=67,
                        norm_eps=NORM_EPS, tie_embeddings=True, bos_token_id=0, eos_token_id=0),
    # Qwen3: QK-norm, a head dim of its own (4 x 48 = 192 != d_model 64). Its head is untied
    # as Llama's: the tied embedding (std 0.3) gives logits 2.4x larger, and float32 rounding
    # differences with them (1.1e-5 measured); the staged tied head is GPT-2's case.
    "qwen3": ModelConfig(family="qwen3", vocab_size=len(TOKENS), d_model=64, n_layers=2,
                         n_heads=4, n_kv_heads=2, head_dim=48, ffn_dim=192, max_seq_len=67,
                         norm_eps=NORM_EPS, rope_theta=1000000.0, tie_embeddings=False,
                         bos_token_id=1, eos_token_id=0),
}

# A made-up device: the planner's choices only need to be deterministic here.
TEST_DEVICE = DeviceSettings(name="test", calibrated=False, source="test constants",
                             flops_per_s={"float32": 5e10}, mem_read_bytes_per_s=2e10,
                             storage_read_bytes_per_s=1e9, storage_warm_bytes_per_s=1e10,
                             call_overhead_s=2e-5, ram_bytes=2**33)


# ---- cases ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    schedule: str = "atomic"
    quant: str = "none"
    cache: str = "disk"
    order: str = "head_major"
    block_tokens: int = 8
    kv_block: int = 8
    activations: str = "ram"
    depth: int = 2
    reader: str = "python"
    family: str = "llama"

    @property
    def id(self) -> str:
        return (f"{self.schedule}-{self.quant}-{self.cache}-{self.order}-b{self.block_tokens}-"
                f"kv{self.kv_block}-act{self.activations}-d{self.depth}-{self.reader}-{self.family}")

    @property
    def knobs(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def kv_dtype(self) -> str:
        return CACHE_OPTIONS[self.cache][1]

    def refusal(self) -> tuple[type, str] | None:
        """The error the project answers this combination with, or None if it runs."""
        for refused, error, message in REFUSALS:
            if refused(self.knobs):
                return error, message
        return None

    def settings(self, cache_dir: str | Path, ffn_chunks: int = FFN_CHUNKS,
                 vocab_chunk: int | None = VOCAB_CHUNK, budget_mb: float | None = None,
                 prefill_block: int = PREFILL_BLOCK) -> RunSettings:
        """The run's settings, as a user composes them (`paths.cache`: `cache_dir`)."""
        kind, dtype = CACHE_OPTIONS[self.cache]
        budget = budget_mb if self.schedule in BUDGET_POLICIES else None
        return RunSettings(
            schedule=ScheduleSettings(policy=self.schedule, budget_mb=budget, ffn_chunks=ffn_chunks,
                                      vocab_chunk=vocab_chunk, kv_block=self.kv_block,
                                      prefetch_depth=self.depth, prefill_block=prefill_block,
                                      activations=self.activations),
            quant=QuantSettings(self.quant),
            cache=CacheSettings(kind=kind, dtype=dtype, order=self.order,
                                block_tokens=self.block_tokens),
            store=StoreSettings(verify="open", reader=self.reader),
            device=TEST_DEVICE, paths=PathSettings(cache=str(cache_dir)), compile_cache=False,
            compile_workers=COMPILE_WORKERS)


def _refused(values: dict) -> bool:
    return any(refused(values) for refused, _, _ in REFUSALS)


def pairwise_cases(knobs: dict[str, tuple] = KNOBS, **fixed) -> list[Case]:
    """Every pair of values of any two knobs in at least one case that runs (allpairspy's
    greedy all-pairs, refused combinations excluded), then one case per refused pair. `fixed`
    pins knobs (e.g. family="gpt2" for one family's all-pairs)."""
    knobs = {name: ((fixed[name],) if name in fixed else values) for name, values in knobs.items()}
    names = list(knobs)
    rows = AllPairs([list(v) for v in knobs.values()],
                    filter_func=lambda row: not _refused(dict(zip(names, row))))
    cases = [Case(**dict(zip(names, row))) for row in rows]
    cases += refused_cases(knobs)
    return cases


def refused_cases(knobs: dict[str, tuple] = KNOBS) -> list[Case]:
    """One case per pair of knob values the project refuses (other knobs at their first value)."""
    cases = []
    for (a, va), (b, vb) in itertools.combinations(
            [(name, value) for name, values in knobs.items() for value in values], 2):
        if a != b and _refused({a: va, b: vb}):
            base = {name: values[0] for name, values in knobs.items()}
            cases.append(Case(**{**base, a: va, b: vb}))
    return cases


def uncovered_pairs(cases: list[Case], knobs: dict[str, tuple] = KNOBS) -> list[tuple]:
    """Pairs of knob values that no case holds (runnable or refused): empty for all-pairs."""
    seen = {frozenset([(a, case.knobs[a]), (b, case.knobs[b])])
            for case in cases for a, b in itertools.combinations(knobs, 2)}
    return [(a, va, b, vb) for a, b in itertools.combinations(knobs, 2)
            for va in knobs[a] for vb in knobs[b]
            if frozenset([(a, va), (b, vb)]) not in seen]


# ---- models -----------------------------------------------------------------------------------


def scaled_params(config: ModelConfig, seed: int = 0) -> dict:
    """Random float32 parameters whose attention is far from uniform: each matrix [in, out]
    drawn N(0, gain^2 / in) — gain 1.5 for q and k, so a score q.k / sqrt(H) of normed inputs
    has a standard deviation of ~2.25 —, the embedding N(0, 0.3^2) (logits of ~2-10), norm
    scales 1 + N(0, 0.1^2) (QK-norm's 1.5x that: a normed head's score has a std of ~1 x
    gain^2 then), biases N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)

    def draw(path: tuple[str, ...], leaf) -> np.ndarray:
        shape, name = np.shape(leaf), path[-1]
        if path[-2:] in (("embed", "embedding"), ("pos_embed", "embedding")):
            std = 0.3 if path[0] == "embed" else 0.1
            return rng.normal(0, std, shape).astype(np.float32)
        if name == "kernel":
            fan_in = int(np.prod(shape[:2 if path[-2] == "o" else 1]))
            gain = 1.5 if path[-2] in ("q", "k") else 1.0
            return rng.normal(0, gain / np.sqrt(fan_in), shape).astype(np.float32)
        if name == "scale":
            gain = 1.5 if path[-2] in ("q_norm", "k_norm") else 1.0
            return (gain * (1 + rng.normal(0, 0.1, shape))).astype(np.float32)
        return rng.normal(0, 0.1, shape).astype(np.float32)

    def walk(node, path=()):
        if isinstance(node, dict):
            return {k: walk(v, path + (k,)) for k, v in sorted(node.items())}
        return draw(path, node)

    return walk(jax.tree_util.tree_map(np.asarray, init_params(config, seed)))


def _llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py), the inverse of the importer's."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(path: str | Path, config: ModelConfig, params: dict) -> Path:
    """`params` (Decoder layout) as a GGUF file the importer reads back to `config`: matrices as
    Q4_1 blocks, the token embedding as Q8_0, vectors (and GPT-2's positions) as F32."""
    gpt2 = not config.traits.rope
    placements = gpt2_placements(config) if gpt2 else llama_placements(config, config.tie_embeddings)
    tensors: dict[str, np.ndarray] = {}
    for p in placements:
        value = params
        for key in p.param_path:
            value = value[key]
        value = np.asarray(value, np.float32)
        numpy_shape = tuple(reversed(p.gguf_shape))
        if p.transpose:  # [in, out] -> [out, in]
            part = value.reshape(p.gguf_shape[0], -1).T
        else:
            part = value.reshape((-1,) + numpy_shape[1:])
        if p.rope_unpermute_heads:
            part = _llamacpp_permute(part, p.rope_unpermute_heads)
        if p.row_slice is None:
            tensors[p.gguf_name] = part.reshape(numpy_shape)
        else:
            whole = tensors.setdefault(p.gguf_name, np.zeros(numpy_shape, np.float32))
            whole[p.row_slice[0]:p.row_slice[1]] = part
    arch = config.traits.names.gguf_architecture if config.traits.names else config.family
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    if not gpt2:
        writer.add_head_count_kv(config.n_kv_heads)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    else:
        writer.add_layer_norm_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    for name, w in tensors.items():
        matrix = w.ndim == 2 and name != "position_embd.weight"
        ggml_type = (Q.Q8_0 if name == "token_embd.weight" else Q.Q4_1) if matrix else Q.F32
        writer.add_tensor(name, gguf.quants.quantize(w, ggml_type),
                          raw_dtype=None if ggml_type == Q.F32 else ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


@dataclasses.dataclass
class Reference:
    """The monolithic model on one stored scheme and KV dtype: a prompt, its greedy
    continuation, the full forward's logits over both, and the NLL of the scored window."""

    tokens: list[int]
    prompt_len: int
    logits: np.ndarray  # [len(tokens), V]
    nll: np.ndarray  # [NLL_WINDOW - 1]: NLL of tokens[1:NLL_WINDOW]
    atol: float  # what a staged run may differ by (`MatrixModel.tolerance`)
    decidable: list[bool]  # per generated token: its top-2 gap exceeds twice `atol`

    @property
    def greedy(self) -> list[int]:
        return self.tokens[self.prompt_len:]


class MatrixModel:
    """One family's tiny model: its GGUF source, a checkpoint per scheme (converted once), and
    the monolithic reference per (scheme, KV dtype)."""

    def __init__(self, family: str, directory: Path, config: ModelConfig | None = None,
                 preset: str | None = None, checkpoints: str | Path | None = None,
                 ffn_chunks: int = FFN_CHUNKS, vocab_chunk: int | None = VOCAB_CHUNK,
                 budget_mb: float | None = None, atol: float = ATOL,
                 lossy_sensitivity: bool = False):
        """`preset`: a real model instead (the slow tier's SmolLM2), converted under
        `checkpoints` (None: the user's `paths.cache`, where runs keep theirs) with these
        chunks; `budget_mb`: the budget policies' (None: `budget_between_atomic_and_layer`);
        `atol`: its float32 tolerance (lossy KV dtypes get `lossy_atol`);
        `lossy_sensitivity`: a deep model, whose lossy KV dtypes are held to the monolithic
        model's own sensitivity instead (see `tolerance`)."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.directory if preset is None else checkpoints
        self.ffn_chunks, self.vocab_chunk, self.budget_mb = ffn_chunks, vocab_chunk, budget_mb
        self.atol, self.lossy_sensitivity = atol, lossy_sensitivity
        if preset is not None:
            self.handle = open_model(preset)
        else:
            config = config or FAMILY_CONFIGS[family]
            source = write_gguf(self.directory / f"matrix-{family}.gguf", config,
                                scaled_params(config))
            self.handle = open_model("tiny_gpt2" if family == "gpt2" else "tiny", str(source))
            assert self.handle.config == config, (self.handle.config, config)
        self.config = self.handle.config
        self._stores: dict[str, WeightStore] = {}
        self._references: dict[tuple[str, str], Reference] = {}
        self._forward = jax.jit(forward_logits, static_argnums=(0, 3))

    def tolerance(self, kv_dtype: str, sensitivity: float = 0.0) -> float:
        """float32 caches: `atol`. Lossy ones: `lossy_atol`, or twice `sensitivity` where that
        is larger: the largest logit change the monolithic model with the same cache makes
        when layer 0's norm scale moves by 1e-7 relative (one float32 rounding). A rounding step
        taken differently in one early value is carried and grown through every later layer:
        SmolLM2 with an int8 cache moves by 0.15-0.30 so (a float32 cache: 6e-5), and staged
        runs differ from the monolithic one by up to 0.24. On the tiny models most lossy
        combinations move by under 5e-5 and keep `lossy_atol`; with re-quantized asymmetric
        int4 weights an int8 cache moves by 1.3e-3 (GPT-2) and 1.6e-3 (Qwen3), a bfloat16 one by
        3.1e-4 (Llama), and a staged GPT-2 run differed by 5.6e-4 there."""
        if kv_dtype == "float32":
            return self.atol
        return max(lossy_atol(self.atol), 2 * sensitivity)

    def sensitivity(self, params, ids, kv_dtype: str, logits: np.ndarray) -> float:
        """Largest logit change when layer 0's norm scale moves by +-1e-7 relative."""
        changes = []
        for eps in (1e-7, -1e-7):
            moved = jax.tree_util.tree_map(lambda x: x, params)
            layer = dict(moved["L0"])
            layer["attn_norm"] = {**layer["attn_norm"],
                                  "scale": layer["attn_norm"]["scale"] * np.float32(1 + eps)}
            moved["L0"] = layer
            other = np.asarray(self._forward(self.config, moved, ids, kv_dtype))[0]
            changes.append(float(np.max(np.abs(other - logits))))
        return max(changes)

    def settings(self, case: "Case", prefill_block: int = PREFILL_BLOCK) -> RunSettings:
        budget_mb = self.budget_mb
        if budget_mb is None and case.schedule in BUDGET_POLICIES:
            budget_mb = self.budget_between_atomic_and_layer(case, prefill_block)
        return case.settings(self.directory, self.ffn_chunks, self.vocab_chunk, budget_mb,
                             prefill_block)

    def budget_between_atomic_and_layer(self, case: "Case", prefill_block: int) -> float:
        """Half-way between the planned peaks of `atomic` and `layer` under the case's other
        settings (depth, cache, quantization move both): a budget the case can meet that
        still makes the budget policies choose their own groups."""
        peaks = []
        for policy in ("atomic", "layer"):
            settings = dataclasses.replace(case, schedule=policy).settings(
                self.directory, self.ffn_chunks, self.vocab_chunk, None, prefill_block)
            store = self.store(case.quant)
            m = store.manifest
            layout = ChunkLayout(tuple(m.ffn_chunk_bounds), tuple(m.vocab_chunk_bounds))
            cache = settings.cache
            kv = KVLayout(cache.kind, cache.order, cache.block_tokens, cache.dtype)
            context = plan_context(settings, self.config, layout, store, kv,
                                   self.capacity(case.quant, case.kv_dtype),
                                   device_from_settings(settings.device))
            peaks.append(make_plan(build_stages(self.config, layout, m.arrays), policy, context,
                                   None).every_pass_peak_bytes)
        return sum(peaks) / 2 / 2**20

    def capacity(self, quant: str, kv_dtype: str) -> int:
        """KV rows a case allocates: the reference's tokens and one more."""
        return len(self.reference(quant, kv_dtype).tokens) + 1

    def store(self, quant: str) -> WeightStore:
        if quant not in self._stores:
            path = convert_checkpoint(self.handle, self.checkpoints, ffn_chunks=self.ffn_chunks,
                                      vocab_chunk=self.vocab_chunk, quant=quant, progress=False)
            self._stores[quant] = WeightStore(path, verify="open", expect_config=self.config)
        return self._stores[quant]

    def resident_params(self, quant: str):
        """What the `model` schedule holds: the stored arrays assembled, quantized leaves kept."""
        store = self.store(quant)
        m = store.manifest
        arrays = store.read(m.keys)
        params = jax.tree_util.tree_map(jnp.array, assemble_params(
            arrays, self.config, m.ffn_chunk_bounds, m.vocab_chunk_bounds))
        store.release(arrays)
        return params

    def reference(self, quant: str, kv_dtype: str, prompt_len: int = PROMPT_TOKENS,
                  new_tokens: int = NEW_TOKENS, prompt: list[int] | None = None) -> Reference:
        key = (quant, kv_dtype)
        if key not in self._references:
            params = self.resident_params(quant)
            length = prompt_len + new_tokens
            forward = lambda ids: np.asarray(self._forward(  # noqa: E731
                self.config, params, jnp.asarray([ids + [0] * (length - len(ids))]), kv_dtype))[0]
            # Greedy must be decidable at the tolerance: the best logit of every generated
            # token leads the second by > 4x the tolerance; else the next prompt (seeds 7, 8, ...).
            for seed in itertools.count(7):
                rng = np.random.default_rng(seed)
                tokens = list(prompt) if prompt is not None else [
                    int(t) for t in rng.integers(3, self.config.vocab_size, prompt_len)]
                for _ in range(new_tokens):  # greedy through the full forward (right padding
                    logits = forward(tokens)[len(tokens) - 1]  # is masked by causality)
                    tokens.append(int(np.argmax(logits)))
                logits = forward(tokens)
                top2 = np.sort(logits[prompt_len - 1:-1], axis=-1)[:, -2:]
                gaps = top2[:, 1] - top2[:, 0]
                sensitivity = 0.0
                if kv_dtype != "float32":
                    ids = jnp.asarray([tokens + [0] * (length - len(tokens))])
                    sensitivity = self.sensitivity(params, ids, kv_dtype, logits)
                atol = self.tolerance(kv_dtype, sensitivity)
                if kv_dtype != "float32" and self.lossy_sensitivity:
                    # The tolerance is the model's own noise: tokens are compared only where
                    # it decides them (the staged run is fed the reference's tokens, so later
                    # steps stay comparable after a token the noise could flip).
                    break
                if np.all(gaps > 4 * atol) or prompt is not None:
                    break
            window = min(NLL_WINDOW, len(tokens))
            log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[:window - 1]), axis=-1))
            nll = -np.take_along_axis(log_probs, np.asarray(tokens[1:window])[:, None], 1)[:, 0]
            self._references[key] = Reference(tokens, prompt_len, logits, nll, atol,
                                              [bool(g > 2 * atol) for g in gaps])
        return self._references[key]

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()


def attention_entropy(config: ModelConfig, params: dict, tokens: list[int]) -> float:
    """Mean entropy of layer 0's attention over the queries with >= 8 keys, as a fraction of
    the uniform attention's (log of the keys seen): 1.0 is uniform."""
    x = jnp.asarray(params["embed"]["embedding"])[jnp.asarray(tokens)][None]
    positions = jnp.arange(len(tokens))[None]
    layer = params["L0"]
    if config.family == "gpt2":
        x = x + jnp.asarray(params["pos_embed"]["embedding"])[: len(tokens)][None]
        h = ops.layer_norm(x, layer["attn_norm"]["scale"], layer["attn_norm"]["bias"], config.norm_eps)
    else:
        h = ops.rms_norm(x, layer["attn_norm"]["scale"], config.norm_eps)
    q = jnp.einsum("BTD,DNH->BTNH", h, layer["q"]["kernel"])
    k = jnp.einsum("BTD,DKH->BTKH", h, layer["k"]["kernel"])
    if config.traits.qk_norm:
        q = ops.rms_norm(q, layer["q_norm"]["scale"], config.norm_eps)
        k = ops.rms_norm(k, layer["k_norm"]["scale"], config.norm_eps)
    if config.family == "gpt2":
        q, k = q + layer["q"]["bias"], k + layer["k"]["bias"]
    else:
        q = ops.rope(q, positions, config.rope_theta)
        k = ops.rope(k, positions, config.rope_theta)
    k = jnp.repeat(k, config.queries_per_kv_head, axis=2)
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(config.head_dim)
    causal = np.tril(np.ones((len(tokens), len(tokens)), bool))
    probs = np.asarray(jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1))[0]
    fractions = []
    for t in range(7, len(tokens)):
        p = probs[:, t, :t + 1]
        entropy = -np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-30)), 0), axis=-1)
        fractions.append(entropy / np.log(t + 1))
    return float(np.mean(fractions))


# ---- the checker -------------------------------------------------------------------------------


def _close(got, expected, what: str, atol: float) -> None:
    got = np.asarray(got)
    diff = float(np.max(np.abs(got - expected)))
    assert diff <= atol, f"{what}: staged differs from monolithic by {diff:.3g} (> {atol:g})"


def check_case(case: Case, model: MatrixModel,
               mutate: Callable[[object], None] | None = None) -> None:
    """Run `case` staged and hold it to the monolithic reference (see the module docstring);
    a refused case must raise its documented error. `mutate(decoder)` changes the staged
    decoder after it is built (the mutation tests). Raises AssertionError on any difference."""
    refusal = case.refusal()
    settings = model.settings(case)
    reference = model.reference(case.quant, case.kv_dtype)
    atol = reference.atol
    store = model.store(case.quant)
    capacity = model.capacity(case.quant, case.kv_dtype)
    if refusal is not None:
        error, message = refusal
        try:
            ScheduleRun(settings, model.handle, store, capacity, reference.prompt_len,
                        SamplingConfig()).close()
        except error as e:
            assert re.search(message, str(e)), f"refused with another message: {e}"
            return
        raise AssertionError(f"{case.id}: expected {error.__name__} matching {message!r}")
    run = ScheduleRun(settings, model.handle, store, capacity, reference.prompt_len, SamplingConfig())
    decoder = run.engine
    try:
        if mutate is not None:
            mutate(decoder)
        tokens, p = reference.tokens, reference.prompt_len
        logits = decoder.prefill(tokens[:p])
        _close(logits, reference.logits[p - 1], "prefill logits", atol)
        got = [int(np.argmax(np.asarray(logits)))]
        for position in range(p, len(tokens) - 1):
            logits = decoder.step(tokens[position], position)
            _close(logits, reference.logits[position], f"decode step at position {position}", atol)
            got.append(int(np.argmax(np.asarray(logits))))
        decided = [(g, r) for g, r, d in zip(got, reference.greedy, reference.decidable) if d]
        assert all(g == r for g, r in decided), (
            f"greedy tokens {got} != monolithic {reference.greedy} (compared where decidable: "
            f"{reference.decidable})")
        nll = decoder.token_nll(tokens[:len(reference.nll) + 1])
        _close(nll, reference.nll, "NLL", atol)
    finally:
        decoder.close()

