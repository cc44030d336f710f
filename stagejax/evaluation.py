"""Perplexity of a token stream under a model, by two published procedures.

- llama.cpp's `perplexity` tool: consecutive chunks of `n_ctx` tokens, each evaluated from an
  empty cache; only the second half of each chunk is scored (logits at positions
  [n_ctx/2, n_ctx - 1) predicting the next token), PPL = exp(mean NLL) with the standard error
  llama.cpp prints (ppl * sqrt(var(NLL) / (N - 1))).
- Hugging Face's strided sliding window (docs "Perplexity of fixed-length models"): windows of
  `n_ctx` tokens advancing by `stride`, scoring only the tokens not scored by earlier windows.

Both take `nll_fn(tokens_1T) -> nll_1(T-1)`, the negative log-likelihood of each next token, so
the same procedure measures the monolithic model and any staged schedule through its own path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

NllFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class PerplexityResult:
    ppl: float
    ppl_stderr: float
    mean_nll: float
    n_scored_tokens: int
    n_chunks: int
    n_ctx: int
    procedure: str

    @classmethod
    def from_nlls(cls, nlls: np.ndarray, n_chunks: int, n_ctx: int, procedure: str):
        nlls = np.asarray(nlls, np.float64)
        mean = float(nlls.mean())
        ppl = math.exp(mean)
        variance = float(np.mean(nlls * nlls) - mean * mean)
        stderr = ppl * math.sqrt(variance / (len(nlls) - 1)) if variance > 0 and len(nlls) > 1 else 0.0
        return cls(ppl, stderr, mean, len(nlls), n_chunks, n_ctx, procedure)


def tokens_scored(procedure: str, n_ctx: int, n_chunks: int, stride: int | None = None) -> int:
    """How many of the text's first tokens a procedure reads for `n_chunks` chunks (windows):
    encoding more changes nothing but the memory and time it takes."""
    if procedure == "llama_cpp":
        return n_chunks * n_ctx
    return (n_chunks - 1) * stride + n_ctx


def perplexity_llama_cpp(nll_fn: NllFn, tokens: Sequence[int], n_ctx: int,
                         n_chunks: int | None = None, progress: bool = True) -> PerplexityResult:
    """llama.cpp's procedure over the first `n_chunks` chunks (all that fit when None)."""
    tokens = np.asarray(tokens, np.int32)
    available = len(tokens) // n_ctx
    if available == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one chunk of n_ctx={n_ctx}")
    if n_chunks is not None and n_chunks <= 0:
        raise ValueError(f"eval.ppl_chunks must be positive, got {n_chunks}")
    n_chunks = available if n_chunks is None else min(n_chunks, available)
    first = n_ctx // 2
    scored = []
    for chunk in tqdm(range(n_chunks), desc=f"perplexity (n_ctx={n_ctx})", disable=not progress):
        window = tokens[chunk * n_ctx:(chunk + 1) * n_ctx]
        nll = np.asarray(nll_fn(window[None, :]))[0]
        scored.append(nll[first:n_ctx - 1])
    return PerplexityResult.from_nlls(np.concatenate(scored), n_chunks, n_ctx, "llama_cpp")


def perplexity_strided(nll_fn: NllFn, tokens: Sequence[int], n_ctx: int, stride: int,
                       n_windows: int | None = None, progress: bool = True) -> PerplexityResult:
    """Hugging Face's strided sliding-window procedure (each token scored once)."""
    if not 0 < stride <= n_ctx:
        raise ValueError(f"stride must be in (0, n_ctx={n_ctx}], got {stride}")
    tokens = np.asarray(tokens, np.int32)
    total_windows = -(-max(len(tokens) - n_ctx, 0) // stride) + 1  # the last one reaches the end
    if n_windows is not None:
        total_windows = min(total_windows, n_windows)
    scored, previous_end = [], 0
    bar = tqdm(total=total_windows, desc=f"perplexity (strided {n_ctx}/{stride})",
               disable=not progress)
    for begin in range(0, total_windows * stride, stride):
        end = min(begin + n_ctx, len(tokens))
        target_len = end - previous_end
        nll = np.asarray(nll_fn(tokens[None, begin:end]))[0]  # nll[p - 1] scores position p
        first_scored = max(1, (end - begin) - target_len)
        scored.append(nll[first_scored - 1:])
        previous_end = end
        bar.update()
    bar.close()
    return PerplexityResult.from_nlls(np.concatenate(scored), len(scored), n_ctx, "strided")
