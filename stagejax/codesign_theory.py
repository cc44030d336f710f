"""The co-design paper's closed-form optima and a numerical optimiser to check them against.

Owns the formulas of arXiv 2602.10377 §5 (Table 4, Eq. 8-11, 24-26, 29, 37, 42) as functions,
each citing its equation, and `optimise_architecture`, which minimises the paper's loss law
(`stagejax.architecture_law`) over depth l, FFN ratio r and expert ratio ρ at a fixed width d
under any of the paper's three budgets (prefill FLOPs, decode bytes, memory). The closed forms
are the paper's; where its printed algebra and the constraints it starts from disagree, both
are here (`rho_star_decode_memory_printed` and `rho_star_decode_memory`), so the reproduction
can say by how much.

Per-layer coefficients (large-d approximation, matrices only; Eq. 24-26), gqa = n_h / n_kv:
  ξ_F = 4 + 4/gqa + 6r,  ξ_W^dec = 2 + 2/gqa + 3r,  ξ_W^all = 2 + 2/gqa + 3r/ρ,
  α_attn = 2 + 2/gqa,  δ = 2·S̄·b_kv / (gqa·d·b_w),  S̄ = S_in + (S_out + 1)/2.
Constraints (§5.2): prefill l·ξ_F·d² ≤ F̄_p; decode l·Γ ≤ M̄_d with Γ = ξ_W^dec·d²·b_w +
2·S̄·d·b_kv/gqa; memory l·ξ_W^all·d²·b_w ≤ M_budget.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import optimize

from stagejax.architecture_law import ArchitectureLaw


def alpha_attn(gqa: float) -> float:
    """α_attn = 2 + 2/gqa: the attention projections' weights per layer / d² (§5.4)."""
    return 2.0 + 2.0 / gqa


def xi_flops(r: float, gqa: float) -> float:
    """ξ_F = 4 + 4/gqa + 6r: FLOPs per token per layer / d² (Eq. 24)."""
    return 4.0 + 4.0 / gqa + 6.0 * r


def xi_decode_weights(r: float, gqa: float) -> float:
    """ξ_W^dec = 2 + 2/gqa + 3r: weights a decode step reads per layer / d² (Eq. 25)."""
    return 2.0 + 2.0 / gqa + 3.0 * r


def xi_all_weights(r: float, gqa: float, rho: float) -> float:
    """ξ_W^all = 2 + 2/gqa + 3r/ρ: stored weights per layer / d² (Eq. 26)."""
    return 2.0 + 2.0 / gqa + 3.0 * r / rho


def mean_context(prompt_tokens: int, new_tokens: int) -> float:
    """S̄ = S_in + (S_out + 1)/2: the mean cache length of the decode steps (§5.2)."""
    return prompt_tokens + (new_tokens + 1) / 2


def kv_delta(mean_context_tokens: float, gqa: float, width: float, kv_bytes: float,
             weight_bytes: float) -> float:
    """δ = 2·S̄·b_kv / (gqa·d·b_w): the KV reads of a decode step per layer / (d²·b_w) (§5.4)."""
    return 2.0 * mean_context_tokens * kv_bytes / (gqa * width * weight_bytes)


def decode_layer_bytes(r: float, gqa: float, width: float, weight_bytes: float, kv_bytes: float,
                       mean_context_tokens: float) -> float:
    """Γ = ξ_W^dec·d²·b_w + 2·S̄·d·b_kv/gqa: the bytes of one layer of a decode step (Table 4)."""
    return (xi_decode_weights(r, gqa) * width ** 2 * weight_bytes
            + 2.0 * mean_context_tokens * width * kv_bytes / gqa)


def decode_budget_bytes(decode_latency_s: float, bandwidth_bytes_per_s: float,
                        new_tokens: int) -> float:
    """M̄_d = T_lat^dec · β_H / S_out: the bytes one decode step may read (§5.2)."""
    return decode_latency_s * bandwidth_bytes_per_s / new_tokens


def prefill_budget_flops(prefill_latency_s: float, peak_flops_per_s: float, batch: int,
                         prompt_tokens: int) -> float:
    """F̄_p = T_lat^pre · π_H / (B · S_in): the FLOPs per prompt token the prefill may spend."""
    return prefill_latency_s * peak_flops_per_s / (batch * prompt_tokens)


# ---- closed-form optima ------------------------------------------------------------------------


def rho_memory_exponent(law: ArchitectureLaw) -> float:
    """(β1 − β2) / α_ρ: the exponent of d in Eq. 9 (stated as −1.19)."""
    return (law.beta1 - law.beta2) / law.alpha_rho


def rho_star_memory(law: ArchitectureLaw, width: float) -> float:
    """Eq. 9, memory-constrained: ρ* = [α_r·κ_d / ((α_ρ − α_r)·κ_ρ)]^(1/α_ρ) · d^((β1−β2)/α_ρ).

    It follows from minimising the law over ρ with r/ρ held by the memory constraint (at fixed
    l, d and gqa, l·(α_attn + 3r/ρ)·d²·b_w = M fixes r/ρ); valid if α_ρ > α_r. Not clipped to
    (0, 1]: a value above 1 means dense.
    """
    if law.alpha_rho <= law.alpha_r:
        raise ValueError(f"Eq. 9 needs alpha_rho > alpha_r, got {law.alpha_rho} <= {law.alpha_r}")
    prefactor = law.alpha_r * law.kappa_d / ((law.alpha_rho - law.alpha_r) * law.kappa_rho)
    return prefactor ** (1.0 / law.alpha_rho) * width ** rho_memory_exponent(law)


def rho_star_prefill_memory(eta_p: float, weight_bytes: float, r: float, gqa: float,
                            attention_flops_d2: float = 0.0) -> float:
    """Eq. 10, prefill and memory both active: ρ* = 3·η_p·b_w·r / (α_attn·(2 − η_p·b_w) + 6r),
    for η_p·b_w < 2, with η_p = F̄_p / M_budget.

    From l·ξ_F·d² = F̄_p and l·ξ_W^all·d²·b_w = M: ξ_F = η_p·b_w·ξ_W^all. `attention_flops_d2`
    adds the attention FLOPs per token / d² that Eq. 24 drops (4·S_in/d + 5·n_h·S_in/d² in the
    paper's own per-operator counts) to ξ_F; 0 gives the printed Eq. 10.
    """
    a = alpha_attn(gqa)
    return 3.0 * eta_p * weight_bytes * r / (a * (2.0 - eta_p * weight_bytes) + attention_flops_d2
                                             + 6.0 * r)


def rho_star_decode_memory_printed(eta: float, delta: float, r: float, gqa: float) -> float:
    """Eq. 11 as printed: ρ* = 3r / (ξ_M* − α_attn), ξ_M* = [(α_attn + 3r) +
    √((α_attn + 3r)² + 4ηδ)] / (2η), the positive root of Eq. 113, η·x² − (α+3r)·x − δ = 0."""
    a = alpha_attn(gqa)
    xi_m = ((a + 3 * r) + math.sqrt((a + 3 * r) ** 2 + 4 * eta * delta)) / (2 * eta)
    return 3.0 * r / (xi_m - a)


def rho_star_decode_memory(eta: float, delta: float, r: float, gqa: float) -> float:
    """Decode and memory both active, solved from the constraints themselves:

    l·Γ = M̄_d and l·ξ_W^all·d²·b_w = M  ⇒  Γ / (ξ_W^all·d²·b_w) = η
      ⇒ (α_attn + 3r + δ) / ξ_W^all = η   (Γ / (d²·b_w) = ξ_W^dec + δ, a constant over ξ_W^all)
      ⇒ ξ_W^all = (α_attn + 3r + δ) / η   (linear: no quadratic)
      ⇒ ρ* = 3r / (ξ_W^all − α_attn) = 3r·η / (α_attn·(1 − η) + 3r + δ).

    The printed step 106 → 109 divides the KV term by ξ_W^all twice (δ/ξ_W^all inside the
    bracket, then the bracket by ξ_W^all), which turns this linear equation into Eq. 113.
    """
    a = alpha_attn(gqa)
    return 3.0 * r * eta / (a * (1.0 - eta) + 3.0 * r + delta)


def depth_star_memory(memory_bytes: float, r: float, gqa: float, rho: float, width: float,
                      weight_bytes: float) -> float:
    """l* = M_budget / (ξ_W^all·d²·b_w): depth saturating the memory constraint (§5.4)."""
    return memory_bytes / (xi_all_weights(r, gqa, rho) * width ** 2 * weight_bytes)


def depth_star_decode(decode_bytes: float, r: float, gqa: float, width: float,
                      weight_bytes: float, kv_bytes: float, mean_context_tokens: float) -> float:
    """l* = M̄_d / Γ = M̄_d / (ξ_W^eff·d²·b_w): depth saturating the decode constraint (§5.4)."""
    return decode_bytes / decode_layer_bytes(r, gqa, width, weight_bytes, kv_bytes,
                                             mean_context_tokens)


def depth_star_prefill(prefill_flops: float, r: float, gqa: float, width: float) -> float:
    """l* = F̄_p / (ξ_F·d²): depth saturating the prefill constraint (§5.4)."""
    return prefill_flops / (xi_flops(r, gqa) * width ** 2)


# ---- the numerical optimum ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConstrainedOptimum:
    """The law's minimum over (l, r, ρ) at fixed d and gqa under the given budgets.

    `depth_limits[name]` is the depth each budget alone allows at the optimum's (r, ρ);
    `active` names the budgets within `tolerance` of the binding one (both, in a dual regime);
    `at_bounds` names the search bounds the optimum sits on.
    """

    width: float
    gqa: float
    depth: float
    ffn_ratio: float
    expert_ratio: float
    loss: float
    depth_limits: dict[str, float]
    active: tuple[str, ...]
    at_bounds: tuple[str, ...]


def _depth_limits(r, rho, *, width, gqa, weight_bytes, kv_bytes, mean_context_tokens,
                  memory_bytes, decode_bytes, prefill_flops, attention_flops_d2):
    limits = {}
    d2 = width ** 2
    if memory_bytes is not None:
        limits["memory"] = memory_bytes / ((2 + 2 / gqa + 3 * r / rho) * d2 * weight_bytes)
    if decode_bytes is not None:
        gamma = (2 + 2 / gqa + 3 * r) * d2 * weight_bytes + 2 * mean_context_tokens * width * kv_bytes / gqa
        limits["decode"] = decode_bytes / gamma
    if prefill_flops is not None:
        limits["prefill"] = prefill_flops / ((4 + 4 / gqa + 6 * r + attention_flops_d2) * d2)
    return limits


def optimise_architecture(law: ArchitectureLaw, width: float, gqa: float, *,
                          weight_bytes: float = 2.0, kv_bytes: float = 2.0,
                          mean_context_tokens: float = 1032.5,
                          memory_bytes: float | None = None, decode_bytes: float | None = None,
                          prefill_flops: float | None = None, attention_flops_d2: float = 0.0,
                          rho_bounds: tuple[float, float] = (1 / 64, 1.0),
                          ffn_ratio_bounds: tuple[float, float] = (1 / 64, 64.0),
                          depth_bounds: tuple[float, float] = (1.0, 4096.0),
                          grid_points: int = 241, tolerance: float = 1e-3) -> ConstrainedOptimum:
    """Minimise `law` over continuous depth l, FFN ratio r and expert ratio ρ at width `width`
    (d_m = d / gqa) subject to the budgets given (None: not a constraint), with the paper's
    constraint coefficients (§5.2; `attention_flops_d2` adds attention FLOPs to ξ_F).

    The law falls with l, so at any (r, ρ) the best depth is the largest any budget allows,
    l(r, ρ) = min over budgets (clipped to `depth_bounds`); the 2-D problem in (log r, log ρ)
    is solved on a `grid_points`² log grid and polished with Nelder-Mead from the grid's best.
    """
    if memory_bytes is None and decode_bytes is None and prefill_flops is None:
        raise ValueError("optimise_architecture needs at least one budget")
    kv_width = width / gqa
    kw = dict(width=width, gqa=gqa, weight_bytes=weight_bytes, kv_bytes=kv_bytes,
              mean_context_tokens=mean_context_tokens, memory_bytes=memory_bytes,
              decode_bytes=decode_bytes, prefill_flops=prefill_flops,
              attention_flops_d2=attention_flops_d2)
    log_r_bounds = np.log(ffn_ratio_bounds)
    log_rho_bounds = np.log(rho_bounds)

    def depth_of(r, rho):
        limits = _depth_limits(r, rho, **kw)
        depth = np.minimum.reduce(list(limits.values()))
        return np.clip(depth, *depth_bounds)

    def loss_of(log_r, log_rho):
        r, rho = np.exp(log_r), np.exp(log_rho)
        return law(depth_of(r, rho), width, r, rho, kv_width)

    grid_r = np.linspace(*log_r_bounds, grid_points)
    grid_rho = np.linspace(*log_rho_bounds, grid_points)
    mesh_r, mesh_rho = np.meshgrid(grid_r, grid_rho, indexing="ij")
    losses = loss_of(mesh_r, mesh_rho)
    i, j = np.unravel_index(np.argmin(losses), losses.shape)

    def objective(x):
        log_r = float(np.clip(x[0], *log_r_bounds))
        log_rho = float(np.clip(x[1], *log_rho_bounds))
        return float(loss_of(log_r, log_rho))

    polished = optimize.minimize(objective, np.array([grid_r[i], grid_rho[j]]),
                                 method="Nelder-Mead",
                                 options={"xatol": 1e-9, "fatol": 1e-13, "maxiter": 4000})
    x = polished.x if polished.fun <= losses[i, j] else np.array([grid_r[i], grid_rho[j]])
    log_r = float(np.clip(x[0], *log_r_bounds))
    log_rho = float(np.clip(x[1], *log_rho_bounds))
    r, rho = math.exp(log_r), math.exp(log_rho)
    limits = {k: float(v) for k, v in _depth_limits(r, rho, **kw).items()}
    binding = min(limits.values())
    active = tuple(k for k, v in limits.items() if v <= binding * (1 + tolerance))
    depth = float(np.clip(binding, *depth_bounds))
    at_bounds = []
    for name, value, (low, high) in (("ffn_ratio", r, ffn_ratio_bounds),
                                     ("expert_ratio", rho, rho_bounds),
                                     ("depth", depth, depth_bounds)):
        if value <= low * (1 + 1e-6):
            at_bounds.append(f"{name} min")
        if value >= high * (1 - 1e-6):
            at_bounds.append(f"{name} max")
    if depth != binding:
        active = ()
    return ConstrainedOptimum(width, gqa, depth, r, rho, float(law(depth, width, r, rho, kv_width)),
                              limits, active, tuple(at_bounds))
