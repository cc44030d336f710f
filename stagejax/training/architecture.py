"""A sweep point as a `ModelConfig`, and what it costs: parameter counts and training FLOPs.

Parameter counts follow Kaplan et al. 2020 (arXiv 2001.08361): N, the *non-embedding* count,
excludes the token embedding and (when untied) the LM head; the norms stay in. It is the N of the
loss laws L(N) and L(N, D). A mixture of experts has a stored N (every expert, its routers) and
an active N (the K experts a token uses), counted by `stagejax.moe_accounting`.

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
from stagejax.moe_accounting import MoEArchitecture, model_params
from stagejax.training.settings import ArchSettings


def model_config(arch: ArchSettings, vocab_size: int, seq_len: int) -> ModelConfig:
    """The `ModelConfig` of `arch` with the tokenizer's vocabulary: the Llama family, or with
    `qk_norm` the Qwen3 family (the same layer with a norm per query and key head)."""
    return ModelConfig(
        family="qwen3" if arch.qk_norm else "llama", vocab_size=vocab_size, d_model=arch.d_model, n_layers=arch.n_layers,
        n_heads=arch.n_heads, n_kv_heads=arch.n_kv_heads, head_dim=arch.resolved_head_dim,
        ffn_dim=arch.ffn_dim, max_seq_len=seq_len, norm_eps=arch.norm_eps,
        rope_theta=arch.rope_theta, tie_embeddings=arch.tie_embeddings,
        n_experts=arch.n_experts, experts_per_token=arch.top_k)


def moe_architecture(c: ModelConfig) -> MoEArchitecture:
    """The co-design search's description of a Llama-family config (its parameter accounting,
    `stagejax.moe_accounting`, is the one the loss law's N and the search use)."""
    if c.traits.biases or not c.traits.gated_ffn or c.traits.learned_positions:
        raise ValueError(f"parameter counts cover bias-free SwiGLU layers with rotary positions "
                         f"(the Llama family), got the {c.family!r} family")
    return MoEArchitecture(depth=c.n_layers, width=c.d_model, n_heads=c.n_heads,
                           n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
                           expert_ffn_ratio=c.ffn_dim / c.d_model, n_experts=c.n_experts,
                           top_k=c.experts_per_token, vocab=c.vocab_size,
                           tie_embeddings=c.tie_embeddings)


def param_counts(c: ModelConfig) -> dict:
    """Parameter counts of a Llama-family config: "total" and "non_embedding" hold every expert
    (what is stored), "active" and "non_embedding_active" the K routed ones (what a token
    uses); "embedding" is the token table plus an untied head. Dense: active = total."""
    arch = moe_architecture(c)
    embedding = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    qk_norms = 2 * c.head_dim * c.n_layers if c.traits.qk_norm else 0  # a scale each for q, k
    total = int(round(model_params(arch, "full"))) + qk_norms
    active = int(round(model_params(arch, "full", active=True))) + qk_norms
    return {"non_embedding": total - embedding, "non_embedding_active": active - embedding,
            "embedding": embedding, "total": total, "active": active}


def forward_flops_per_token(c: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of a `seq_len` window (see the module docstring); a mixture of
    experts counts its K routed experts and its router."""
    qkv = 2 * c.d_model * c.head_dim * (c.n_heads + 2 * c.n_kv_heads)
    scores = 2 * seq_len * c.n_heads * c.head_dim
    softmax = 3 * seq_len * c.n_heads
    values = 2 * seq_len * c.n_heads * c.head_dim
    out = 2 * c.n_heads * c.head_dim * c.d_model
    ffn = 2 * 3 * c.d_model * c.ffn_dim * c.experts_per_token
    router = 2 * c.d_model * c.n_experts if c.is_moe else 0
    head = 2 * c.d_model * c.vocab_size
    return c.n_layers * (qkv + scores + softmax + values + out + ffn + router) + head


def training_flops(c: ModelConfig, seq_len: int, tokens: int) -> dict:
    """{"flops_6nd", "flops_exact"} for training on `tokens` tokens (6 N D with the active
    non-embedding N: a token's forward and backward touch only its experts)."""
    n = param_counts(c)["non_embedding_active"]
    return {"flops_6nd": 6 * n * tokens,
            "flops_exact": 3 * forward_flops_per_token(c, seq_len) * tokens}
