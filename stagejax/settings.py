"""Typed settings of a run: the dataclass schemas behind hydra's `conf/` (design §6).

Library code receives these dataclasses, never a DictConfig; `stagejax.run` registers them in
hydra's ConfigStore and converts the composed config with `OmegaConf.to_object`. Every value is
checked in `__post_init__`, so a bad override fails before anything is loaded.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

from stagejax.model_config import PRESETS

# Options implemented so far; design §5/§6 name more, which later work adds here and in conf/.
SCHEDULE_POLICIES = ("atomic", "op", "layer", "model", "budget", "similar_size", "optimal")
BUDGET_POLICIES = ("budget", "similar_size", "optimal")
ACTIVATION_LOCATIONS = ("ram", "disk")
# Weight storage schemes (stagejax.quant.SCHEMES; listed here so settings import no JAX).
QUANT_SCHEMES = ("none", "int8", "int4_g32", "int4_g64", "int4_g32_asym", "gguf_native")
CACHE_KINDS = ("ram", "disk")
CACHE_DTYPES = ("float32", "bfloat16", "int8")
CACHE_ORDERS = ("head_major", "token_major")
EVAL_PROCEDURES = ("llama_cpp", "strided")
# How the evaluation text becomes a string: "bytes" decodes the file's bytes as they are (as
# llama.cpp's `perplexity -f` reads it; wiki.test.raw keeps its CRLF line ends), "text" as
# Python's text mode does (universal newlines: CRLF and CR become LF). The two tokenize into
# different streams: ~3% apart in SmolLM2's perplexity.
TEXT_MODES = ("bytes", "text")
DEFAULT_N_CTX = 512  # llama.cpp's perplexity context in the published SmolLM2 figures
TRACKING_MODES = ("offline", "online", "disabled")


def _check_choice(field: str, value, choices):
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of: {', '.join(map(str, choices))}")


def _check_positive(field: str, value):
    if value is None or value <= 0:
        raise ValueError(f"{field} must be a positive number, got {value!r}")


@dataclasses.dataclass
class ModelSettings:
    name: str = "smollm2_135m"
    path: Optional[str] = None  # a GGUF file or HF directory instead of the preset's source

    def __post_init__(self):
        _check_choice("model.name", self.name, sorted(PRESETS))


@dataclasses.dataclass
class ScheduleSettings:
    policy: str = "atomic"
    budget_mb: Optional[float] = None
    # Chunking is a conversion parameter: one checkpoint serves every schedule with these values.
    ffn_chunks: int = 8  # SmolLM2: 1.3 MB per FFN chunk stage
    vocab_chunk: Optional[int] = 512  # tokens per LM-head stage (None: the whole vocabulary)
    kv_block: int = 512  # KV rows per attention block read (context 512: one block)
    prefetch_depth: int = 2  # units read ahead; the store's thread hand-off makes 1 slow here
    prefill_block: int = 64  # tokens per staged prefill / scoring pass
    activations: str = "ram"

    def __post_init__(self):
        _check_choice("schedule.policy", self.policy, SCHEDULE_POLICIES)
        _check_positive("schedule.ffn_chunks", self.ffn_chunks)
        _check_positive("schedule.kv_block", self.kv_block)
        _check_positive("schedule.prefill_block", self.prefill_block)
        if self.vocab_chunk is not None:
            _check_positive("schedule.vocab_chunk", self.vocab_chunk)
        if self.budget_mb is not None:
            _check_positive("schedule.budget_mb", self.budget_mb)
        if self.prefetch_depth < 0:
            raise ValueError(f"schedule.prefetch_depth must be >= 0, got {self.prefetch_depth}")
        _check_choice("schedule.activations", self.activations, ACTIVATION_LOCATIONS)
        if self.policy in BUDGET_POLICIES and self.budget_mb is None:
            raise ValueError(f"schedule.policy={self.policy} needs schedule.budget_mb (the RAM "
                             f"budget in MB, e.g. schedule.budget_mb=8)")
        if self.policy == "model" and self.activations == "disk":
            raise ValueError("schedule.activations=disk needs a staged policy: `model` keeps "
                             "everything resident in one jit")


@dataclasses.dataclass
class QuantSettings:
    """How weights are stored in the stage shards (stagejax.quant): float32 (`none`), re-quantized
    (`int8` per output channel, `int4_g32`/`int4_g64` symmetric groups, `int4_g32_asym` with zero
    points) or a GGUF file's own blocks (`gguf_native`). Whether a group size divides every
    weight's input dimension depends on the model: checked when the model is converted."""

    scheme: str = "none"

    def __post_init__(self):
        _check_choice("quant.scheme", self.scheme, QUANT_SCHEMES)


@dataclasses.dataclass
class CacheSettings:
    kind: str = "ram"  # ram: host arrays; disk: a file per layer, read block by block
    dtype: str = "float32"  # float32 | bfloat16 | int8 (one scale per token and kv head)
    order: str = "head_major"
    block_tokens: Optional[int] = None  # rows per stored block; None: schedule.kv_block

    def __post_init__(self):
        _check_choice("cache.kind", self.kind, CACHE_KINDS)
        _check_choice("cache.dtype", self.dtype, CACHE_DTYPES)
        _check_choice("cache.order", self.order, CACHE_ORDERS)
        if self.block_tokens is not None:
            _check_positive("cache.block_tokens", self.block_tokens)


@dataclasses.dataclass
class DeviceSettings:
    """A device profile (conf/device/): measured on this machine (`calibrated: true`, cached)
    or published figures. Used to predict per-group and per-step time (stagejax.roofline)."""

    name: str = "this_machine"
    calibrated: bool = True
    source: Optional[str] = None
    flops_per_s: Optional[Dict[str, float]] = None
    mem_read_bytes_per_s: Optional[float] = None
    storage_read_bytes_per_s: Optional[float] = None
    storage_warm_bytes_per_s: Optional[float] = None
    call_overhead_s: Optional[float] = None
    ram_bytes: Optional[float] = None
    matvec_bytes_per_s: Optional[float] = None
    notes: Optional[Dict[str, str]] = None

    def __post_init__(self):
        if not self.calibrated:
            missing = [f for f in ("flops_per_s", "mem_read_bytes_per_s", "storage_read_bytes_per_s",
                                   "storage_warm_bytes_per_s", "call_overhead_s", "ram_bytes")
                       if getattr(self, f) is None]
            if missing:
                raise ValueError(f"device {self.name!r} is not calibrated and lacks: {', '.join(missing)}")


@dataclasses.dataclass
class StoreSettings:
    verify: str = "open"  # checksums: all once on open | every read | off (sizes only)
    drop_page_cache: bool = False  # evict the checkpoint's pages first: a reproducible cold run
    # Who reads streamed weights ahead: the GIL-free C reader (native), a Python thread (python),
    # or auto: native unless verify=read, prefetch_depth=0 or no C compiler (store/native_stream.py)
    reader: str = "auto"

    def __post_init__(self):
        _check_choice("store.verify", self.verify, ("open", "read", "off"))
        _check_choice("store.reader", self.reader, ("auto", "native", "python"))


@dataclasses.dataclass
class EvalSettings:
    ppl_chunks: int = 4
    n_ctx: Optional[int] = None  # None: DEFAULT_N_CTX, or the model's context where shorter
    procedure: str = "llama_cpp"
    stride: int = 256  # for the strided procedure only
    dataset: str = "wikitext-2/wiki.test.raw"
    text_mode: str = "bytes"  # see TEXT_MODES

    def __post_init__(self):
        if self.ppl_chunks < 0:
            raise ValueError(f"eval.ppl_chunks must be >= 0 (0 skips perplexity), got {self.ppl_chunks}")
        if self.n_ctx is not None:
            _check_positive("eval.n_ctx", self.n_ctx)
            if self.n_ctx < 4:
                raise ValueError(f"eval.n_ctx must be at least 4 tokens, got {self.n_ctx}")
        _check_positive("eval.stride", self.stride)
        _check_choice("eval.procedure", self.procedure, EVAL_PROCEDURES)
        _check_choice("eval.text_mode", self.text_mode, TEXT_MODES)

    def context(self, max_seq_len: int) -> int:
        """The perplexity context for a model of `max_seq_len` tokens: `n_ctx` when set (and
        refused when longer than the model's), else DEFAULT_N_CTX capped at the model's."""
        if self.n_ctx is None:
            return min(DEFAULT_N_CTX, max_seq_len)
        if self.n_ctx > max_seq_len:
            raise ValueError(f"eval.n_ctx={self.n_ctx} exceeds the model's context of "
                             f"{max_seq_len} tokens; set eval.n_ctx to at most {max_seq_len}, or "
                             f"leave it unset (eval.n_ctx=null: {DEFAULT_N_CTX}, or the model's "
                             "context where shorter)")
        return self.n_ctx


@dataclasses.dataclass
class DecodeSettings:
    prompt: str = "The capital of France is"
    max_new_tokens: int = 32
    chat: bool = False
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.prompt and not self.chat:
            raise ValueError("decode.prompt is empty: give it some text to continue, e.g. "
                             "decode.prompt='Once upon a time'")
        _check_positive("decode.max_new_tokens", self.max_new_tokens)
        if self.temperature < 0:
            raise ValueError(f"decode.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"decode.top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"decode.top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class PathSettings:
    data: Optional[str] = None  # None: $STAGEJAX_DATA or ../shared/data from the repo root
    cache: Optional[str] = None  # None: $STAGEJAX_CACHE or ~/.cache/stagejax
    # Where a disk KV cache and activations on disk keep their (unnamed) files; it should be on
    # a disk, not tmpfs. None: `<paths.cache>/scratch`.
    scratch: Optional[str] = None


@dataclasses.dataclass
class TrackingSettings:
    mode: str = "offline"
    project: str = "stagejax"
    # trace.json and timeline.png after the run (matplotlib: ~50 MB more RSS, which a run under
    # a tight whole-process cap may not have after its decode)
    artifacts: bool = True

    def __post_init__(self):
        _check_choice("tracking.mode", self.mode, TRACKING_MODES)


EXPORT_TARGETS = ("host", "aarch64")


@dataclasses.dataclass
class ExportSettings:
    """`python -m stagejax.export`: the plan as an IREE bundle for the device runtime."""

    out: Optional[str] = None  # the bundle directory (None: outputs/bundles/<model>-<schedule>-<quant>-<cache>)
    target: str = "host"  # host: this machine's CPU; aarch64: e.g. a Raspberry Pi 5 (Cortex-A76)
    self_contained: bool = False  # copy the stage shards into the bundle (to carry it to a device)
    context: int = 512  # KV rows the bundle's executables are compiled for (prompt + generated)

    def __post_init__(self):
        _check_choice("export.target", self.target, EXPORT_TARGETS)
        _check_positive("export.context", self.context)


@dataclasses.dataclass
class RunSettings:
    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    schedule: ScheduleSettings = dataclasses.field(default_factory=ScheduleSettings)
    quant: QuantSettings = dataclasses.field(default_factory=QuantSettings)
    cache: CacheSettings = dataclasses.field(default_factory=CacheSettings)
    store: StoreSettings = dataclasses.field(default_factory=StoreSettings)
    device: DeviceSettings = dataclasses.field(default_factory=DeviceSettings)
    eval: EvalSettings = dataclasses.field(default_factory=EvalSettings)
    decode: DecodeSettings = dataclasses.field(default_factory=DecodeSettings)
    paths: PathSettings = dataclasses.field(default_factory=PathSettings)
    tracking: TrackingSettings = dataclasses.field(default_factory=TrackingSettings)
    export: ExportSettings = dataclasses.field(default_factory=ExportSettings)
    seed: int = 0
    compile_cache: bool = True  # keep compiled executables under paths.cache/xla for later runs
    # With the cache: compile a streamed plan's configuration the cache has not seen in a helper
    # process first, so the run itself loads its executables; XLA's compiler leaves tens of MB
    # behind in the process that compiles, which would sit in the run's baseline
    # (stagejax.experiment.fill_compile_cache).
    compile_in_helper: bool = True
    # Convert a model the cache does not hold yet in a helper process: reading the source
    # (SmolLM2's GGUF dequantized to float32: 1.2 GB high-water) leaves heap and Python objects
    # behind that would sit in a first run's baseline (stagejax.experiment.convert_in_helper).
    convert_in_helper: bool = True
    # Executables compiled at once (staged plans): faster start-up on several cores, at the cost
    # of concurrent compiles' temporaries in the start-up's high-water RSS; 1 keeps it lowest.
    compile_workers: int = 1

    def __post_init__(self):
        _check_positive("compile_workers", self.compile_workers)
        # Combinations: checked here, before anything loads.
        block = self.cache.block_tokens
        if block is not None and self.schedule.kv_block % block:
            raise ValueError(f"schedule.kv_block={self.schedule.kv_block} must be a multiple of "
                             f"cache.block_tokens={block}: attention reads whole stored blocks")
