"""Mixture-of-experts FFN math: top-K routing per token, experts run only on the tokens routed
to them, and the load-balancing auxiliary loss.

Routing (Switch Transformer, arXiv 2101.03961; GShard): router probabilities p = softmax(h W_r)
over E experts; each token goes to its K most probable experts, weighted by their (not
renormalised) probabilities, so the router is trained through the gates even at K = 1.

The experts run dropless on gathered tokens: the T·K (token, expert) assignments are sorted by
expert and laid out in blocks of `block_rows` rows, each expert's rows padded to whole blocks;
each block gathers its rows' tokens and its expert's weights, and the outputs are gathered
back per assignment and summed with the gates. Compute is (T·K + E·(block_rows − 1)) rows
instead of the dense-masked T·E; no token is dropped (no capacity factor). XLA's CPU lowering
of `jax.lax.ragged_dot` is dense-masked (every group over every row), hence the blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def route(router_logits_TE, k: int):
    """(experts_TK int32, gates_TK, probs_TE): each token's K most probable experts, in
    decreasing probability, their probabilities as gates, and every expert's probability."""
    probs_TE = jax.nn.softmax(router_logits_TE.astype(jnp.float32), axis=-1)
    gates_TK, experts_TK = jax.lax.top_k(probs_TE, k)
    return experts_TK.astype(jnp.int32), gates_TK, probs_TE


def load_balancing_loss(probs_TE, experts_TK):
    """Switch's auxiliary loss E · Σ_e f_e · P_e, with f_e the fraction of the T·K assignments
    routed to expert e and P_e its mean router probability. With routing that follows the
    probabilities it is 1 when both are uniform and grows to E when every token picks one expert
    (for f = P it is E·Σ P_e² ≥ 1, equal only at uniform: Cauchy-Schwarz)."""
    n_experts = probs_TE.shape[-1]
    assigned_E = jnp.sum(jax.nn.one_hot(experts_TK, n_experts, dtype=jnp.float32), axis=(0, 1))
    fraction_E = assigned_E / experts_TK.size
    return n_experts * jnp.sum(fraction_E * jnp.mean(probs_TE, axis=0))


def default_block_rows(assignments: int, n_experts: int) -> int:
    """Rows per expert block: a power of two near a quarter of an expert's even share, at most
    64 (one row per assignment in decoding, where the padding would outweigh the work)."""
    share = max(1, assignments // (4 * n_experts))
    return min(64, 1 << (share.bit_length() - 1))


def expert_swiglu(x_TD, experts_TK, gates_TK, w_gate_EDF, w_up_EDF, w_down_EFD,
                  block_rows: int | None = None):
    """Σ_k gates[t, k] · SwiGLU_{experts[t, k]}(x[t]) for every token t: [T, D]."""
    t, k = experts_TK.shape
    n_experts, d = w_gate_EDF.shape[0], x_TD.shape[-1]
    b = block_rows or default_block_rows(t * k, n_experts)
    assignments = t * k
    expert_A = experts_TK.reshape(-1)
    token_A = jnp.repeat(jnp.arange(t, dtype=jnp.int32), k)
    order_A = jnp.argsort(expert_A, stable=True)  # assignments sorted by expert
    sorted_expert_A = expert_A[order_A]
    count_E = jnp.bincount(expert_A, length=n_experts)
    padded_E = -(-count_E // b) * b
    start_E = jnp.cumsum(count_E) - count_E
    padded_start_E = jnp.cumsum(padded_E) - padded_E
    # row of each sorted assignment in the padded layout
    row_A = padded_start_E[sorted_expert_A] + jnp.arange(assignments) - start_E[sorted_expert_A]
    rows = -(-(assignments + n_experts * (b - 1)) // b) * b  # a static bound on the padded rows
    blocks = rows // b
    # token of each row; padding rows read row t, a zero row appended to x
    token_R = jnp.full((rows,), t, jnp.int32).at[row_A].set(token_A[order_A])
    x_RD = jnp.concatenate([x_TD, jnp.zeros((1, d), x_TD.dtype)])[token_R]
    # expert of each block: how many experts' padded rows end at or before the block's start
    block_start_N = jnp.arange(blocks) * b
    expert_N = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded_E), block_start_N, side="right"),
                           n_experts - 1)
    x_NbD = x_RD.reshape(blocks, b, d)
    gate_NbF = jnp.einsum("NbD,NDF->NbF", x_NbD, w_gate_EDF[expert_N].astype(x_TD.dtype))
    up_NbF = jnp.einsum("NbD,NDF->NbF", x_NbD, w_up_EDF[expert_N].astype(x_TD.dtype))
    y_NbD = jnp.einsum("NbF,NFD->NbD", jax.nn.silu(gate_NbF) * up_NbF,
                       w_down_EFD[expert_N].astype(x_TD.dtype))
    # back to assignments in token order, weighted and summed over each token's K experts
    row_of_assignment_A = jnp.zeros((assignments,), jnp.int32).at[order_A].set(row_A)
    y_TKD = y_NbD.reshape(rows, d)[row_of_assignment_A].reshape(t, k, d)
    return jnp.einsum("TK,TKD->TD", gates_TK.astype(x_TD.dtype), y_TKD)
