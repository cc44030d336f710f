"""What compiling costs a run, and not paying it twice: JAX's persistent compilation cache under
`paths.cache`, and counters of tracing, lowering, backend compilation and cache hits.

XLA's CPU compiler is most of a staged run's start-up (tens of executables) and it leaves
memory behind; with the persistent cache a second identical run loads the compiled
executables instead. Tracing and lowering are never cached, so they are counted apart
(`jax.monitoring` events), as design §7's `compile_s` split asks.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import jax
import jax.monitoring

_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "backend_s",
}


@dataclasses.dataclass
class CompileCounters:
    trace_s: float = 0.0
    lower_s: float = 0.0
    backend_s: float = 0.0  # XLA compiles, or loads from the persistent cache
    cache_hits: int = 0
    cache_misses: int = 0

    def since(self, start: "CompileCounters") -> "CompileCounters":
        return CompileCounters(*(getattr(self, f.name) - getattr(start, f.name)
                                 for f in dataclasses.fields(self)))


_TOTALS = CompileCounters()
_LOCK = threading.Lock()  # executables can compile on several threads (compile_workers)
_listening = False


def _on_duration(name: str, seconds: float, **_) -> None:
    field = _EVENTS.get(name)
    if field is not None:
        with _LOCK:
            setattr(_TOTALS, field, getattr(_TOTALS, field) + seconds)


def _on_event(name: str, **_) -> None:
    with _LOCK:
        if name == "/jax/compilation_cache/cache_hits":
            _TOTALS.cache_hits += 1
        elif name == "/jax/compilation_cache/cache_misses":
            _TOTALS.cache_misses += 1


def counters() -> CompileCounters:
    """This process's totals so far (listening starts on the first call)."""
    global _listening
    if not _listening:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        jax.monitoring.register_event_listener(_on_event)
        _listening = True
    with _LOCK:
        return dataclasses.replace(_TOTALS)


def use_persistent_cache(cache_dir: Path) -> Path:
    """Keep every compiled executable under `cache_dir/xla` (JAX's persistent compilation
    cache). By default JAX skips executables that compile in under a second or are small,
    which is every one of a staged plan's; here all are kept (a SmolLM2 atomic plan: ~0.7 MB)."""
    directory = Path(cache_dir) / "xla"
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    counters()
    return directory
