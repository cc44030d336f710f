"""Reference (monolithic) decoding: full forward, KV-cached prefill and one-token steps.

This is the `model` schedule of design §5 — every weight resident, one jit per decode step,
KV cache in RAM — and the reference every staged schedule is checked against. Executables are
compiled ahead of time (`jit(...).lower(...).compile()`) so no timed call compiles; the KV
cache is donated to a small write executable after each pass, so it is updated in place.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from stagejax.models import ops
from stagejax.model_config import ModelConfig
from stagejax.models import Decoder, init_kv_cache, write_kv_rows
from stagejax.sampling import SamplingConfig, sample_token

# Prompts are right-padded to a power of two (at least this many tokens) so that prompts of
# similar length share one prefill executable while padding costs at most 2x. Padded rows land
# in the cache beyond the prompt, where the causal mask hides them until a decode step
# overwrites them.
MIN_PREFILL_TOKENS = 8
# The cache length is rounded up to a multiple of this, so nearby lengths share executables.
CACHE_LEN_MULTIPLE = 64


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def prefill_bucket(prompt_len: int, max_seq_len: int) -> int:
    return min(max(MIN_PREFILL_TOKENS, 1 << (prompt_len - 1).bit_length()), max_seq_len)


@dataclasses.dataclass
class GenerationResult:
    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    stopped_at_eos: bool
    compile_s: float
    prefill_s: float
    decode_s: float
    n_decode_steps: int

    @property
    def time_to_first_token_s(self) -> float:
        return self.prefill_s

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.n_decode_steps / self.decode_s if self.n_decode_steps else float("nan")


def forward_logits(config: ModelConfig, params, tokens_BT, kv_dtype: str = "float32"):
    """Cache-free forward: logits [B, T, V] float32 (keys/values through a `kv_dtype` cache's
    round trip)."""
    logits, _ = Decoder(config, kv_dtype).apply({"params": params}, tokens_BT)
    return logits


def token_nll(config: ModelConfig, params, tokens_BT, kv_dtype: str = "float32"):
    """Negative log-likelihood of tokens[:, 1:] given their prefixes: [B, T - 1] float32."""
    log_probs = ops.log_softmax(forward_logits(config, params, tokens_BT, kv_dtype)[:, :-1])
    return -jnp.take_along_axis(log_probs, tokens_BT[:, 1:, None], axis=-1)[..., 0]


class MonolithicDecoder:
    """Prefill + step decoding with all weights resident (the `model` schedule)."""

    def __init__(self, config: ModelConfig, params_spec, cache_len: int, prefill_len: int,
                 sampling: SamplingConfig = SamplingConfig(), cache_dtype=jnp.float32,
                 kv_dtype: str = "float32"):
        """Compiles prefill, step and sampling for `params_spec` (arrays or ShapeDtypeStructs)."""
        if prefill_len > cache_len:
            raise ValueError(f"prefill length {prefill_len} exceeds the cache length {cache_len}")
        self.config = config
        self.cache_len, self.prefill_len = cache_len, prefill_len
        self.cache_dtype = cache_dtype
        # The resident cache stays float32; a lossy `kv_dtype` is applied as its round trip.
        model = Decoder(config, kv_dtype)

        # A pass reads the cache and returns its new rows; a second executable, with the
        # cache donated, writes them in place (one executable that read and updated a donated
        # cache made XLA copy every layer's cache twice per step: see `write_kv_rows`).
        def prefill(params, tokens_1T, n_tokens, cache):
            logits_1TV, rows = model.apply({"params": params}, tokens_1T, kv_cache=cache, start=0,
                                           rows_only=True)
            return logits_1TV[0, n_tokens - 1], rows

        def step(params, token, position, cache):
            logits_11V, rows = model.apply({"params": params}, token.reshape(1, 1),
                                           kv_cache=cache, start=position, rows_only=True)
            return logits_11V[0, 0], rows

        abstract = lambda tree: jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
        cache_spec = abstract(jax.eval_shape(lambda: init_kv_cache(config, 1, cache_len, cache_dtype)))
        params_spec = abstract(params_spec)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        start = time.perf_counter()
        self._prefill = jax.jit(prefill).lower(
            params_spec, jax.ShapeDtypeStruct((1, prefill_len), jnp.int32), scalar, cache_spec).compile()
        self._step = jax.jit(step).lower(params_spec, scalar, scalar, cache_spec).compile()
        write = jax.jit(write_kv_rows, donate_argnums=(0,))
        self._write = {}
        for tokens in sorted({1, prefill_len}):
            rows_spec = tuple((jax.ShapeDtypeStruct(k.shape[:2] + (tokens,) + k.shape[3:], k.dtype),) * 2
                              for k, _ in cache_spec)
            self._write[tokens] = write.lower(cache_spec, rows_spec, scalar).compile()
        self._sample = jax.jit(lambda logits, key: sample_token(logits, key, sampling)).lower(
            jax.ShapeDtypeStruct((config.vocab_size,), jnp.float32),
            jax.ShapeDtypeStruct((2,), jnp.uint32)).compile()
        self.compile_s = time.perf_counter() - start

    def warm_up(self, params) -> float:
        """Run prefill and one step once on a scratch cache; returns the seconds it took.

        The first execution of an XLA CPU executable costs ~0.2 s more than later ones
        (measured on SmolLM2); timing it would charge a one-off runtime cost to the first token.
        """
        start = time.perf_counter()
        logits, cache = self.prefill(params, [0], self.new_cache())
        logits, cache = self.step(params, 0, 1, cache)
        jax.block_until_ready((logits, cache))
        return time.perf_counter() - start

    def new_cache(self):
        return init_kv_cache(self.config, 1, self.cache_len, self.cache_dtype)

    def prefill(self, params, prompt_ids, cache):
        """Run the prompt; returns (logits of its last token [V], cache)."""
        n = len(prompt_ids)
        tokens = np.zeros((1, self.prefill_len), np.int32)
        tokens[0, :n] = prompt_ids
        logits, rows = self._prefill(params, jnp.asarray(tokens), jnp.int32(n), cache)
        return logits, self._write[self.prefill_len](cache, rows, jnp.int32(0))

    def step(self, params, token, position: int, cache):
        """One decode step: the token at `position`; returns (its logits [V], cache)."""
        position = jnp.int32(position)
        logits, rows = self._step(params, jnp.asarray(token, jnp.int32), position, cache)
        return logits, self._write[1](cache, rows, position)

    def sample(self, logits_V, key):
        return self._sample(logits_V, key)


def check_context(prompt_len: int, max_new_tokens: int, max_seq_len: int):
    if prompt_len == 0:
        raise ValueError("the prompt is empty: give decode.prompt some text")
    if prompt_len + max_new_tokens > max_seq_len:
        raise ValueError(
            f"prompt of {prompt_len} tokens + decode.max_new_tokens={max_new_tokens} exceeds the "
            f"model's context of {max_seq_len} tokens; shorten the prompt or generate fewer tokens")


def decoder_for(config: ModelConfig, params_spec, prompt_len: int, max_new_tokens: int,
                sampling: SamplingConfig = SamplingConfig(), kv_dtype: str = "float32") -> MonolithicDecoder:
    """A decoder sized for this prompt and generation length (shapes bucketed)."""
    prefill_len, cache_len = decoder_shape(config, prompt_len, max_new_tokens)
    return MonolithicDecoder(config, params_spec, cache_len, prefill_len, sampling, kv_dtype=kv_dtype)


def decoder_shape(config: ModelConfig, prompt_len: int, max_new_tokens: int) -> tuple[int, int]:
    """(prefill length, cache length) of the decoder for this prompt and generation length."""
    check_context(prompt_len, max_new_tokens, config.max_seq_len)
    prefill_len = prefill_bucket(prompt_len, config.max_seq_len)
    cache_len = min(round_up(max(prefill_len, prompt_len + max_new_tokens), CACHE_LEN_MULTIPLE),
                    config.max_seq_len)
    return prefill_len, cache_len


class MonolithicSession:
    """`MonolithicDecoder` with its parameters and KV cache bound: the session protocol that
    `generate` drives (prefill(ids) -> logits, step(token, position) -> logits, sample)."""

    def __init__(self, decoder: MonolithicDecoder, params):
        self.decoder, self.params = decoder, params
        self.cache = None

    def prefill(self, prompt_ids):
        if len(prompt_ids) > self.decoder.prefill_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds the decoder's prefill "
                             f"length {self.decoder.prefill_len}")
        logits, self.cache = self.decoder.prefill(self.params, prompt_ids, self.decoder.new_cache())
        return logits

    def step(self, token, position: int):
        logits, self.cache = self.decoder.step(self.params, token, position, self.cache)
        return logits

    def sample(self, logits, key):
        return self.decoder.sample(logits, key)


def generate(config: ModelConfig, params, prompt_ids: list[int], max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             eos_token_id: int | None = None, decoder: MonolithicDecoder | None = None,
             detokenize=None) -> GenerationResult:
    """Generate with the monolithic reference (all weights resident)."""
    prompt_len = len(prompt_ids)
    check_context(prompt_len, max_new_tokens, config.max_seq_len)
    if decoder is None:
        decoder = decoder_for(config, params, prompt_len, max_new_tokens, sampling)
    elif prompt_len > decoder.prefill_len or prompt_len + max_new_tokens > decoder.cache_len:
        raise ValueError(f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens does not fit "
                         f"the decoder (prefill {decoder.prefill_len}, cache {decoder.cache_len})")
    return run_generation(MonolithicSession(decoder, params), prompt_ids, max_new_tokens, seed,
                          eos_token_id, detokenize, decoder.compile_s)


def sampling_keys(seed: int, max_new_tokens: int) -> np.ndarray:
    """One PRNG key per new token, derived from `seed`: [max_new_tokens, 2] uint32, on the host,
    so taking a token's key is a numpy index, not a JAX op compiled on first use."""
    return np.asarray(jax.random.split(jax.random.PRNGKey(seed), max(max_new_tokens, 1)))


def run_generation(session, prompt_ids: list[int], max_new_tokens: int, seed: int = 0,
                   eos_token_id: int | None = None, detokenize=None,
                   compile_s: float = 0.0, before_decode=None, keys=None) -> GenerationResult:
    """Drive a decoding session: prefill the prompt, then one step per new token, stopping at
    `eos_token_id`. The prefill time is the time to first token; decode tokens/s counts the
    step calls after it. Nothing compiles in here (sessions compile before they are timed).
    `before_decode()` runs between the prefill and the first step (e.g. to reset a memory mark).
    `keys` (one per new token) may be derived in advance: `sampling_keys` compiles on first use."""
    prompt_len = len(prompt_ids)
    if keys is None:
        keys = sampling_keys(seed, max_new_tokens)
    start = time.perf_counter()
    logits = session.prefill(list(prompt_ids))
    token = int(session.sample(logits, keys[0]))
    prefill_s = time.perf_counter() - start

    new_ids = [token]
    stopped = token == eos_token_id
    if before_decode is not None:
        before_decode()
    start = time.perf_counter()
    n_steps = 0
    while not stopped and len(new_ids) < max_new_tokens:
        logits = session.step(token, prompt_len + n_steps)
        token = int(session.sample(logits, keys[len(new_ids)]))
        n_steps += 1
        new_ids.append(token)
        stopped = token == eos_token_id
    decode_s = time.perf_counter() - start
    # The end-of-sequence token ends the text; it is not part of it.
    text = detokenize(new_ids[:-1] if stopped else new_ids) if detokenize else ""
    return GenerationResult(list(prompt_ids), new_ids, text, stopped, compile_s,
                            prefill_s, decode_s, n_steps)
