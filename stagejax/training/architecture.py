"""A sweep point as a `ModelConfig`, and what it costs: parameter counts and training FLOPs.

Parameter counts follow Kaplan et al. 2020 (arXiv 2001.08361): N, the *non-embedding* count,
excludes the token embedding and (when untied) the LM head; the norms stay in. It is the N of the
loss laws L(N) and L(N, D).

FLOPs:
  - `6 N D`, Kaplan's approximation with the non-embedding N (forward 2 N, backward 4 N per token);
  - the exact count of what the model computes, in the manner of Hoffmann et al. 2022
    (arXiv 2203.15556, appendix F): every matmul (2 FLOPs per multiply-add) including the
    attention score and value products over the full `seq_len` window as this implementation
    computes them (the causal mask is applied to a dense score matrix), the LM head, and
    3 FLOPs per softmax score; the embedding is a gather (0 FLOPs); backward = 2 x forward.
    Norms, RoPE, SwiGLU's activation and the optimizer update are left out (each is O(d) per
    token, under 1% here); the compiler's own count, which includes them, is measured
    separately (`flops_xla` in a run's metrics).
"""

from __future__ import annotations

from stagejax.model_config import ModelConfig
from stagejax.training.settings import ArchSettings


def model_config(arch: ArchSettings, vocab_size: int, seq_len: int) -> ModelConfig:
    """The Llama-family `ModelConfig` of `arch` with the tokenizer's vocabulary."""
    return ModelConfig(
        family="llama", vocab_size=vocab_size, d_model=arch.d_model, n_layers=arch.n_layers,
        n_heads=arch.n_heads, n_kv_heads=arch.n_kv_heads, head_dim=arch.resolved_head_dim,
        ffn_dim=arch.ffn_dim, max_seq_len=seq_len, norm_eps=arch.norm_eps,
        rope_theta=arch.rope_theta, tie_embeddings=arch.tie_embeddings)


def layer_params(c: ModelConfig) -> int:
    """Parameters of one Llama block: q, k, v, o, gate, up, down and two RMSNorm scales."""
    attn = c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    ffn = 3 * c.d_model * c.ffn_dim
    return attn + ffn + 2 * c.d_model


def param_counts(c: ModelConfig) -> dict:
    """{"non_embedding", "embedding", "total"} parameter counts of a Llama-family config."""
    if c.traits.biases or not c.traits.gated_ffn or c.traits.learned_positions:
        raise ValueError(f"param_counts covers bias-free SwiGLU layers with rotary positions "
                         f"(the Llama family), got the {c.family!r} family")
    non_embedding = c.n_layers * layer_params(c) + c.d_model  # + the final norm
    embedding = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    return {"non_embedding": non_embedding, "embedding": embedding,
            "total": non_embedding + embedding}


def forward_flops_per_token(c: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of a `seq_len` window (see the module docstring)."""
    qkv = 2 * c.d_model * c.head_dim * (c.n_heads + 2 * c.n_kv_heads)
    scores = 2 * seq_len * c.n_heads * c.head_dim
    softmax = 3 * seq_len * c.n_heads
    values = 2 * seq_len * c.n_heads * c.head_dim
    out = 2 * c.n_heads * c.head_dim * c.d_model
    ffn = 2 * 3 * c.d_model * c.ffn_dim
    head = 2 * c.d_model * c.vocab_size
    return c.n_layers * (qkv + scores + softmax + values + out + ffn) + head


def training_flops(c: ModelConfig, seq_len: int, tokens: int) -> dict:
    """{"flops_6nd", "flops_exact"} for training on `tokens` tokens."""
    n = param_counts(c)["non_embedding"]
    return {"flops_6nd": 6 * n * tokens,
            "flops_exact": 3 * forward_flops_per_token(c, seq_len) * tokens}
