"""Plans: grouping stages under a RAM budget, with predicted time and peak per group (design §5).

A `Plan` is the ordered groups with, per group, its stage ids, the memory it holds (weights,
activations, KV, prefetch slabs — the budget accounting of `stagejax.scheduler.MemoryModel`),
its FLOPs and its predicted time (`stagejax.roofline`). It is validated before any compute: an
infeasible budget raises `InfeasibleBudget`, naming the stage that cannot fit and the smallest
budget that would work (and what finer chunks would need).

Policies under `schedule.budget_mb` (the fixed ones — atomic, op, layer, model — come from
`stagejax.scheduler.group_stages` and are only checked against a budget if one is set):
  budget       — greedy: extend the current group with the next stage while it fits;
  similar_size — cut each layer into the fewest groups that fit, of near-equal weight bytes
                 (the staged-generation article's grouping of stages of similar data volume);
  optimal      — exact dynamic programming over contiguous groupings: the least predicted
                 step time under the budget (`optimal_partition`).

Groups never span a segment boundary (embed | each layer | final norm + LM head): layers have
the same stages, so each layer gets the same grouping and its groups share executables
(compile time does not grow with depth).

Memory of a candidate group. The prefetcher reads every unit into one of depth + 1 slabs as
large as the largest unit, so a plan's slab size S couples its groups: a streamed group holds
S + activations + KV + XLA temporaries + depth x S. The packing policies therefore fix a
slab cap S first, then keep every group's weights under S. They try caps from the largest the
budget allows for the stage with the most activation+KV bytes down to the largest atomic unit
(smaller caps leave room for groups that read a whole layer's KV): `budget` and
`similar_size` keep the packing with the fewest groups, `optimal` the least predicted time.

Time of a candidate group (the separable objective the DP minimises): with a warm page cache,
`warm_group_time` — the main thread's work (FLOPs or bytes computed on, the KV blocks it copies
from the page cache, the executor's measured per-call cost) plus the page-cache copies of the
group's streamed weights, added, not overlapped (measured: every staged plan's step ~ its
resident-weights time + the copy time; docs/design-notes.md). Cold: max(compute, load) with
prefetch (compute + load without). `Plan.predicted_step_s` is this sum; `Plan.pipeline_step_s`
is the roofline's event simulation of the prefetch pipeline with shared reads and calibrated
copy/compute contention (`roofline.predict_step`), for comparison.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

from stagejax import roofline
from stagejax.model_config import ModelConfig
from stagejax.scheduler import (FIXED_POLICIES, Group, GroupPlan, MemoryModel, group_stages,
                                kv_read_bytes, lingering_scratch, streams_weights,
                                xla_scratch_bytes)
from stagejax.stage_kinds import KINDS
from stagejax.stages import ChunkLayout, Stage

BUDGET_POLICIES = ("budget", "similar_size", "optimal")
POLICIES = FIXED_POLICIES + BUDGET_POLICIES
MB = 2 ** 20


class InfeasibleBudget(ValueError):
    """No grouping fits `schedule.budget_mb`; the message says what would."""


@dataclasses.dataclass
class PlanRow:
    """One group of a plan: memory (bytes), work and predicted time."""

    group_id: str
    kind: str
    stage_ids: tuple[str, ...]
    weight_bytes: int
    activation_bytes: int
    kv_bytes: int
    prefetch_bytes: int
    buffer_bytes: int
    scratch_bytes: int  # XLA's temporaries (scheduler.xla_scratch_bytes)
    peak_bytes: int
    flops: float
    bytes_moved: float  # weights + KV + activations the group reads and writes (roofline)
    predicted_s: float  # the group's share of the step (separable objective)
    compute_s: float
    load_s: float


@dataclasses.dataclass
class Plan:
    policy: str
    budget_bytes: int | None
    groups: list[Group]
    rows: list[PlanRow]
    slab_bytes: int
    predicted_step_s: float
    pipeline_step_s: float
    # The run's other passes with the same groups (`pass_name` -> their plan): prefill and
    # scoring passes hold more tokens' activations and XLA temporaries than a decode step.
    passes: dict[str, "Plan"] = dataclasses.field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        return max(r.peak_bytes for r in self.rows)

    @property
    def every_pass_peak_bytes(self) -> int:
        return max([self.peak_bytes] + [p.peak_bytes for p in self.passes.values()])

    def to_json(self) -> dict:
        return {"policy": self.policy, "budget_bytes": self.budget_bytes,
                "slab_bytes": self.slab_bytes, "peak_bytes": self.peak_bytes,
                "predicted_step_s": self.predicted_step_s,
                "pipeline_step_s": self.pipeline_step_s,
                "pass_peak_bytes": {name: p.peak_bytes for name, p in self.passes.items()},
                "groups": [dataclasses.asdict(r) for r in self.rows]}

    def table(self, max_rows: int | None = 40) -> str:
        """The plan as a fixed-width table (long plans: first and last rows)."""
        head = (f"{'group':<28} {'stages':>6} {'weights MB':>10} {'act KB':>8} {'KV KB':>8} "
                f"{'XLA KB':>8} {'ahead MB':>8} {'peak MB':>8} {'MFLOP':>8} {'pred ms':>8}")
        lines = [f"plan: {self.policy}, {len(self.rows)} groups, peak {self.peak_bytes / MB:.2f} MB"
                 + (f" (budget {self.budget_bytes / MB:.2f} MB)" if self.budget_bytes else "")
                 + f", predicted step {self.predicted_step_s * 1e3:.1f} ms"
                 f" (pipeline model {self.pipeline_step_s * 1e3:.1f} ms)"]
        lines += [f"  {name} passes: peak {p.peak_bytes / MB:.2f} MB" for name, p in self.passes.items()]
        lines += [head, "-" * len(head)]
        rows = self.rows
        shown = rows if max_rows is None or len(rows) <= max_rows else (
            rows[:max_rows // 2] + [None] + rows[-max_rows // 2:])
        for r in shown:
            if r is None:
                lines.append(f"{'...':<28}")
                continue
            lines.append(f"{r.group_id[:28]:<28} {len(r.stage_ids):>6} {r.weight_bytes / MB:>10.3f} "
                         f"{r.activation_bytes / 1024:>8.1f} {r.kv_bytes / 1024:>8.1f} "
                         f"{r.scratch_bytes / 1024:>8.1f} {r.prefetch_bytes / MB:>8.2f} {r.peak_bytes / MB:>8.2f} "
                         f"{r.flops / 1e6:>8.2f} {r.predicted_s * 1e3:>8.3f}")
        return "\n".join(lines)


@dataclasses.dataclass
class PlanContext:
    """What planning needs to know about a run.

    `stored_bytes(keys)`: stored bytes of weight arrays (the manifest's; quantization-aware);
    `slab_bytes_of(keys)`: the bytes a unit of these keys occupies in a prefetch slab (arrays
    64-byte aligned); `kv_block_bytes(n_groups)` and `kv_layer_bytes`: the KV cache's read sizes.
    """

    config: ModelConfig
    layout: ChunkLayout
    stored_bytes: Callable[[Sequence[str]], int]
    slab_bytes_of: Callable[[Sequence[str]], int]
    kv_block_bytes: Callable[[int], int]
    kv_layer_bytes: int
    prefetch_depth: int
    device: roofline.Device
    kv_len: int  # past tokens a decode step attends (the context the plan is made for)
    kv_block: int
    past_rows: int  # rows of a layer's past a fused attention reads (the cache's capacity)
    kv_bits: float = 32
    kv_on_disk: bool = True
    warm: bool = True
    tokens: int = 1
    dequant_bytes_of: Callable[[Sequence[str]], int] | None = None  # quantized checkpoints
    # A disk cache's read buffer stays resident between groups (`MemoryModel`): the largest KV
    # read of the plan, charged to every group. Budget policies find it by re-planning.
    kv_resident_bytes: int = 0
    # In passes of many tokens each group also holds its predecessor's XLA temporaries
    # (`scheduler.lingering_scratch`); budget policies charge every group the plan's largest,
    # found by re-planning as the disk cache's read buffer is.
    lingering_scratch_bytes: int = 0
    # When charging the largest leaves nothing feasible: every group's own temporaries in
    # passes of many tokens are held to this cap, and the cap is what each group is charged.
    scratch_cap_bytes: int | None = None
    # A cache in RAM: every layer's rows up to the context, resident through every group.
    kv_ram_bytes: int = 0
    scoring: bool = False  # the pass planned is a perplexity pass (tokens > 1)
    activations_in_ram: bool = True  # else in external memory: a group holds only its own entries
    # (tokens, scoring) of the run's other passes over the same groups: a budget policy packs
    # groups so that every pass fits, and a budget is checked against each.
    other_passes: tuple[tuple[int, bool], ...] = ()

    def __post_init__(self):
        self._cost_cache: dict[tuple, tuple[roofline.Cost, tuple[float, float, float]]] = {}
        self.memory = MemoryModel(
            self.config, self.stored_bytes, self.kv_block_bytes, self.kv_layer_bytes,
            self.prefetch_depth, self.dequant_bytes_of, kv_buffer_persists=self.kv_on_disk,
            resident_kv_bytes=self.kv_ram_bytes,
            scratch_bytes_of=lambda group, tokens, scoring: xla_scratch_bytes(
                group, self.config, tokens, self.kv_block, self.past_rows, scoring, self.layout),
            activations_in_ram=self.activations_in_ram)

    # ---- per group --------------------------------------------------------------------------

    def _passes(self) -> tuple[tuple[int, bool], ...]:
        return ((self.tokens, self.scoring),) + self.other_passes

    def _row(self, group: Group, tokens: int, scoring: bool, slab: int) -> GroupPlan:
        """The group's accounting (`MemoryModel.row`) with slabs of `slab` bytes, charged the
        plan-wide KV read buffer and lingering temporaries found so far."""
        return self.memory.row(group, tokens, scoring, ahead=self.prefetch_depth * slab,
                               buffer=slab if streams_weights(group) else 0,
                               kv_buffer=self.kv_resident_bytes,
                               lingering=self.lingering_scratch_bytes)

    def peak(self, group: Group, slab: int) -> int:
        """The group's peak with slabs of `slab` bytes (it and `prefetch_depth` units ahead), in
        the most demanding of the passes planned for (this one and `other_passes`)."""
        return max(self._row(group, tokens, scoring, slab).peak_bytes
                   for tokens, scoring in self._passes())

    def bytes_besides_slabs(self, group: Group) -> int:
        """The group's peak without any slab (a streamed group's weights, units read ahead)."""
        worst = 0
        for tokens, scoring in self._passes():
            row = self._row(group, tokens, scoring, 0)
            own = max(row.weight_bytes, row.buffer_bytes) if streams_weights(group) else 0
            worst = max(worst, row.peak_bytes - own)
        return worst

    def scratch_bytes(self, group: Group, tokens: int | None = None, scoring: bool | None = None) -> int:
        """XLA's temporaries of the group's own executable in a pass of `tokens` tokens
        (default: the pass planned)."""
        tokens = self.tokens if tokens is None else tokens
        scoring = self.scoring if scoring is None else scoring
        return self.memory.scratch_bytes(group, tokens, scoring)

    def largest_lingering_scratch(self, groups: Sequence[Group]) -> int:
        """The largest temporaries any group leaves to its successor in a pass of many tokens."""
        return max((self.scratch_bytes(g, tokens, scoring) for tokens, scoring in self._passes()
                    if lingering_scratch(tokens) for g in groups), default=0)

    def for_pass(self, tokens: int, scoring: bool) -> "PlanContext":
        """This context planning one pass of `tokens` tokens and nothing else."""
        return dataclasses.replace(self, tokens=tokens, scoring=scoring, other_passes=())

    def unit_bytes(self, group: Group) -> int:
        return self.slab_bytes_of(group.weight_keys) if streams_weights(group) else 0

    def time(self, group: Group) -> tuple[float, float, float]:
        """(objective seconds, compute seconds, load seconds) of a group."""
        return self._costed(group)[1]

    def cost(self, group: Group) -> roofline.Cost:
        return self._costed(group)[0]

    def _costed(self, group: Group) -> tuple[roofline.Cost, tuple[float, float, float]]:
        """The group's roofline cost and times, cached by its composition (stage kinds, indices,
        layers relative to its first, stored bytes), which repeats in every layer: an `atomic`
        plan of SmolLM2 has ~1,150 groups of a few dozen compositions, accounted once per pass."""
        first = next((s.layer for s in group.stages if s.layer is not None), 0)
        key = tuple((s.kind, s.index, None if s.layer is None else s.layer - first,
                     self.stored_bytes(s.weight_keys) if s.weight_keys else 0)
                    for s in group.stages)
        if key not in self._cost_cache:
            cost = roofline.group_cost(group, self.config, tokens=self.tokens, kv_len=self.kv_len,
                                       weight_bytes=self.stored_bytes, kv_bits=self.kv_bits,
                                       layout=self.layout, kv_block=self.kv_block)
            streamed = streams_weights(group)
            compute, load = roofline.predict_parts(cost, self.device, streamed=streamed,
                                                   warm=self.warm, kv_on_disk=self.kv_on_disk)
            if self.warm:
                objective = warm_group_time(cost, self.device, streamed=streamed,
                                            kv_on_disk=self.kv_on_disk)
            else:  # cold: the storage device, not the memory bus, is the bottleneck
                objective = max(compute, load) if self.prefetch_depth else compute + load
            self._cost_cache[key] = (cost, (objective, compute, load))
        return self._cost_cache[key]


def warm_group_time(cost: roofline.Cost, device: roofline.Device, *, streamed: bool,
                    kv_on_disk: bool) -> float:
    """A group's share of a warm step (the separable objective `optimal` minimises):
    main-thread work + page-cache copies, added.

    main = max(FLOPs / peak, bytes computed on / memory bandwidth) + calls x the staged
    executor's measured per-call cost; copies = streamed weight bytes and KV blocks read from
    disk at the page-cache copy rate (`storage_warm_bytes_per_s`; runs measure it on their own
    checkpoint, `WeightStore.warm_read_rate`). Not overlapped: on this 2-core machine an
    `atomic` step with every weight resident took ~45 ms and ~85 ms streamed, `layer` 34-41 and
    71-75 ms, i.e. + the copy time whatever the grouping. The principled alternative — loader
    and executor sharing the copies (`Prefetcher.share_reads`) at the copy/compute rates
    calibrated while both run at once, max(main, (main + copy) / 2) — predicted worse (a budget
    sweep: median error 38% against 26% for this sum), because in a decode step the
    copies run at 5-7 GB/s, far below what the contention probe sees (README). With
    streamed=False and kv_on_disk=False this is the resident `model` step's prediction.
    """
    copy = 0.0
    if streamed:
        copy += cost.weight_bytes
    if kv_on_disk:
        copy += cost.kv_bytes
    copy /= device.storage_warm_bytes_per_s
    main = (max(cost.flops / device.peak_flops("float32"), cost.bytes_moved / device.mem_read_bytes_per_s)
            + cost.n_calls * device.call_overhead_s)
    return main + copy


# ---- structure -----------------------------------------------------------------------------------


def segments(stages: Sequence[Stage]) -> list[list[Stage]]:
    """Runs of stages a group may not cross: embed, each layer, the final norm + LM head."""
    out: list[list[Stage]] = []
    key = object()
    for stage in stages:
        k = (stage.kind,) if KINDS[stage.kind].on_demand else (stage.layer,)
        if not out or k != key:
            out.append([])
            key = k
        out[-1].append(stage)
    return out


def valid_group(stages: Sequence[Stage], config: ModelConfig) -> bool:
    """Whether the executor can run these consecutive stages as one unit: an `on_demand` stage
    (embed) alone; a group of `reads_kv` stages only (attention) is one head or whole kv groups
    of heads (`stage_kinds.StageKind`)."""
    kinds = [KINDS[s.kind] for s in stages]
    if any(k.on_demand for k in kinds):
        return len(stages) == 1
    if all(k.reads_kv for k in kinds):
        g = config.queries_per_kv_head
        return len(stages) == 1 or (len(stages) % g == 0 and stages[0].index % g == 0)
    return True


# ---- the exact dynamic program --------------------------------------------------------------------


def optimal_partition(n: int, cost: Callable[[int, int], float],
                      feasible: Callable[[int, int], bool]) -> tuple[float, list[tuple[int, int]]]:
    """The contiguous partition of items [0, n) into runs [i, j) minimising the sum of
    cost(i, j) over runs that are all feasible: (total, runs). O(n^2) calls.
    Raises ValueError if no partition is feasible."""
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            if best[i] == math.inf or not feasible(i, j):
                continue
            value = best[i] + cost(i, j)
            if value < best[j]:
                best[j], cut[j] = value, i
    if best[n] == math.inf:
        raise ValueError("no feasible partition")
    runs, j = [], n
    while j > 0:
        runs.append((cut[j], j))
        j = cut[j]
    return best[n], runs[::-1]


# ---- policies ---------------------------------------------------------------------------------------


def _slab_cap(stages: Sequence[Stage], ctx: PlanContext, budget: int) -> int:
    """The largest slab with which every single stage still fits the budget: a streamed stage
    holds its own slab and `depth` more, any other stage only the `depth` read ahead."""
    cap = None
    for stage in stages:
        group = Group((stage,))
        rest = ctx.bytes_besides_slabs(group)
        slabs = ctx.prefetch_depth + (1 if streams_weights(group) else 0)
        if slabs:
            limit = (budget - rest) // slabs
            cap = limit if cap is None else min(cap, limit)
    return max(0, cap if cap is not None else budget)


def _fits(group: Group, ctx: PlanContext, budget: int, slab: int) -> bool:
    if ctx.scratch_cap_bytes is not None and ctx.largest_lingering_scratch([group]) > ctx.scratch_cap_bytes:
        return False
    return ctx.unit_bytes(group) <= slab and ctx.peak(group, slab) <= budget


def _groups_under_a_scratch_cap(policy: str, stages, segs, ctx: PlanContext,
                                budget_bytes: int) -> list[Group]:
    """A grouping whose every group keeps its temporaries (in passes of many tokens) under a
    cap that every group is charged as its predecessor's: the largest cap that fits, from the
    lingering charge that did not fit down to what single stages need (raises InfeasibleBudget)."""
    floor = ctx.largest_lingering_scratch([Group((s,)) for s in stages])
    cap = ctx.lingering_scratch_bytes / 1.5
    caps = []
    while cap > floor and len(caps) < 12:
        caps.append(int(cap))
        cap /= 1.5
    for cap in caps + [floor]:
        capped = dataclasses.replace(ctx, scratch_cap_bytes=cap, lingering_scratch_bytes=cap)
        try:
            return _budget_policy_groups(policy, stages, segs, capped, budget_bytes)
        except InfeasibleBudget:
            continue
    raise _infeasible(stages, dataclasses.replace(ctx, lingering_scratch_bytes=floor), budget_bytes)


def _budget_groups(segs, ctx, budget, slab) -> list[Group]:
    groups: list[Group] = []
    for seg in segs:
        current: list[Stage] = []
        for stage in seg:
            trial = current + [stage]
            if current and valid_group(trial, ctx.config) and _fits(Group(tuple(trial)), ctx, budget, slab):
                current = trial
                continue
            if current:
                groups.append(Group(tuple(current)))
            current = [stage]
        groups.append(Group(tuple(current)))
    return groups


def _similar_size_groups(segs, ctx, budget, slab) -> list[Group]:
    """Per segment: the fewest groups greedy packing needs, then cut at near-equal shares of
    the segment's weight bytes (a cut moves earlier whenever a share would not fit)."""
    groups: list[Group] = []
    for seg in segs:
        k = len(_budget_groups([seg], ctx, budget, slab))
        weights = [ctx.stored_bytes(s.weight_keys) if s.weight_keys and not KINDS[s.kind].on_demand else 0
                   for s in seg]
        target = sum(weights) / k
        current: list[Stage] = []
        filled = 0.0
        for stage, w in zip(seg, weights):
            trial = current + [stage]
            over_share = current and filled + w > target * (1 + 1e-9) and filled > 0
            if current and (over_share or not valid_group(trial, ctx.config)
                            or not _fits(Group(tuple(trial)), ctx, budget, slab)):
                groups.append(Group(tuple(current)))
                current, filled = [stage], float(w)
                continue
            current, filled = trial, filled + w
        groups.append(Group(tuple(current)))
    return groups


def _optimal_groups(segs, ctx, budget, slab) -> tuple[float, list[Group]]:
    total, groups = 0.0, []
    solved: dict[tuple, list[tuple[int, int]]] = {}
    for seg in segs:
        key = tuple((s.kind, s.index) for s in seg)  # the same in every layer
        if key not in solved:
            def feasible(i, j, seg=seg):
                return valid_group(seg[i:j], ctx.config) and _fits(Group(tuple(seg[i:j])), ctx, budget, slab)

            def cost(i, j, seg=seg):
                return ctx.time(Group(tuple(seg[i:j])))[0]

            _, solved[key] = optimal_partition(len(seg), cost, feasible)
        for i, j in solved[key]:
            groups.append(Group(tuple(seg[i:j])))
            total += ctx.time(groups[-1])[0]
    return total, groups


def _candidate_slabs(stages, ctx, budget) -> list[int]:
    """Slab caps `optimal` tries: from the largest the budget allows down by factors of ~1.5
    to the largest atomic unit (smaller caps leave room for groups reading a whole layer's KV)."""
    cap = _slab_cap(stages, ctx, budget)
    floor = max(ctx.unit_bytes(Group((s,))) for s in stages)
    caps, value = [], cap
    while value >= floor and len(caps) < 12:
        caps.append(int(value))
        value /= 1.5
    if cap >= floor and floor not in caps:
        caps.append(floor)
    return caps or [cap]


def _budget_policy_groups(policy: str, stages, segs, ctx: PlanContext, budget_bytes: int) -> list[Group]:
    """The grouping a budget policy makes under `ctx` (raises InfeasibleBudget)."""
    if policy == "optimal":
        best = None
        for slab in _candidate_slabs(stages, ctx, budget_bytes):
            try:
                objective, groups = _optimal_groups(segs, ctx, budget_bytes, slab)
            except ValueError:
                continue
            if best is None or objective < best[0] - 1e-15:
                best = (objective, groups)
        if best is None:
            raise _infeasible(stages, ctx, budget_bytes)
        return best[1]
    # Greedy packing under each candidate slab size; the fewest groups win. The largest slab
    # is not always best: a group's own activations, KV and XLA temporaries can exceed every
    # single stage's, and then only a smaller slab leaves room for it.
    pack = _budget_groups if policy == "budget" else _similar_size_groups
    fitting = []
    for slab in _candidate_slabs(stages, ctx, budget_bytes):
        groups = pack(segs, ctx, budget_bytes, slab)
        if all(_fits(g, ctx, budget_bytes, slab) for g in groups):
            fitting.append(groups)
    if not fitting:
        raise _infeasible(stages, ctx, budget_bytes)
    return min(fitting, key=len)


def make_plan(stages: Sequence[Stage], policy: str, ctx: PlanContext,
              budget_bytes: int | None = None) -> Plan:
    """Group `stages` by `policy` and account for every group; validates the budget."""
    if policy not in POLICIES:
        raise ValueError(f"unknown schedule.policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if policy in BUDGET_POLICIES:
        if budget_bytes is None:
            raise ValueError(f"schedule.policy={policy} needs schedule.budget_mb (a RAM budget in MB)")
        check_atomic_fits(stages, ctx, budget_bytes)
        segs = segments(stages)
        # Every group is charged the disk cache's read buffer, the plan's largest KV read,
        # and in passes of many tokens the plan's largest XLA temporaries (its predecessor's),
        # which depend on the grouping: plan, charge them, and plan again until the charges
        # cover the plan's own (they only grow; a few rounds).
        for _ in range(8):
            try:
                groups = _budget_policy_groups(policy, stages, segs, ctx, budget_bytes)
            except InfeasibleBudget:
                # Charging the largest group's temporaries to every group left nothing that
                # fits: larger groups hold larger temporaries, so cap them.
                if not ctx.lingering_scratch_bytes:
                    raise
                groups = _groups_under_a_scratch_cap(policy, stages, segs, ctx, budget_bytes)
            largest_read = max(kv_read_bytes(g, ctx.config, ctx.kv_block_bytes, ctx.kv_layer_bytes)
                               for g in groups) if ctx.kv_on_disk else 0
            lingering = ctx.largest_lingering_scratch(groups)
            if largest_read <= ctx.kv_resident_bytes and lingering <= ctx.lingering_scratch_bytes:
                break
            ctx = dataclasses.replace(ctx, kv_resident_bytes=max(largest_read, ctx.kv_resident_bytes),
                                      lingering_scratch_bytes=max(lingering, ctx.lingering_scratch_bytes))
    else:
        groups = group_stages(stages, policy, ctx.config)
    plan = account(policy, groups, ctx, budget_bytes)
    plan.passes = {pass_name(tokens, scoring): account(policy, groups, ctx.for_pass(tokens, scoring),
                                                       budget_bytes)
                   for tokens, scoring in ctx.other_passes}
    if budget_bytes is not None:
        for name, planned in [(pass_name(ctx.tokens, ctx.scoring), plan), *plan.passes.items()]:
            if planned.peak_bytes > budget_bytes:
                raise _over_budget(policy, groups, planned, name, ctx, budget_bytes)
    return plan


def pass_name(tokens: int, scoring: bool) -> str:
    return "scoring" if scoring else ("decode" if tokens == 1 else "prefill")


def _pass_tokens(ctx: PlanContext, name: str) -> int:
    return next((t for t, sc in ((ctx.tokens, ctx.scoring),) + ctx.other_passes
                 if pass_name(t, sc) == name), ctx.tokens)


def _pass_words(name: str, tokens: int) -> str:
    """How a message names a pass: decode steps are what a plan is for; the others are said."""
    return "" if name == "decode" else f" in its {name} passes of {tokens} tokens"


def _over_budget(policy: str, groups, planned: Plan, name: str, ctx: PlanContext,
                 budget_bytes: int) -> InfeasibleBudget:
    worst = max(planned.rows, key=lambda r: r.peak_bytes)
    tokens = _pass_tokens(ctx, name)
    return InfeasibleBudget(
        f"schedule.policy={policy} needs {planned.peak_bytes / MB:.2f} MB{_pass_words(name, tokens)} "
        f"(group {worst.group_id}: "
        f"weights {worst.weight_bytes / MB:.2f} MB in a {worst.buffer_bytes / MB:.2f} MB slab, "
        f"{worst.prefetch_bytes / MB:.2f} MB read ahead, activations+KV "
        f"{(worst.activation_bytes + worst.kv_bytes) / MB:.2f} MB"
        + (f" ({ctx.kv_ram_bytes / MB:.2f} MB of it the KV cache in RAM; cache=disk streams it)"
           if ctx.kv_ram_bytes else "")
        + f", XLA temporaries "
        f"{worst.scratch_bytes / MB:.2f} MB) but schedule.budget_mb="
        f"{budget_bytes / MB:.4g}; use a budget policy (budget, similar_size, optimal) or a "
        f"budget of at least {math.ceil(planned.peak_bytes / MB * 100) / 100:g} MB"
        + _prefill_block_hint(policy, groups, ctx, name, tokens, budget_bytes))


def _prefill_block_hint(policy: str, groups, ctx: PlanContext, name: str, tokens: int,
                        budget_bytes: int) -> str:
    """For a prefill or scoring pass over the budget: the largest smaller prefill_block with
    which the same groups fit (fewer tokens hold fewer activations and temporaries)."""
    if name == "decode":
        return ""
    kinds = {scoring for _, scoring in ctx.other_passes} | {name == "scoring"}
    smaller = tokens // 2
    while smaller >= 1:  # every pass kind the run makes must fit at that size
        if all(account(policy, groups, ctx.for_pass(smaller, scoring)).peak_bytes <= budget_bytes
               for scoring in kinds):
            return f", or schedule.prefill_block={smaller} (passes of fewer tokens)"
        smaller //= 2
    return ""


def account(policy: str, groups: Sequence[Group], ctx: PlanContext,
            budget_bytes: int | None = None) -> Plan:
    """The plan of a given grouping: memory rows exactly as the executor's (`MemoryModel.plan`)
    (slab = the largest unit), FLOPs and predicted times from the roofline."""
    slab = max((ctx.unit_bytes(g) for g in groups), default=0)
    memory = ctx.memory.plan(groups, ctx.tokens, ctx.scoring, slab)
    rows, costs = [], []
    for group, mem in zip(groups, memory):
        objective, compute, load = ctx.time(group)
        cost = ctx.cost(group)
        costs.append(cost)
        rows.append(PlanRow(group.id, group.kind, tuple(s.id for s in group.stages), mem.weight_bytes,
                            mem.activation_bytes, mem.kv_bytes, mem.prefetch_bytes, mem.buffer_bytes,
                            mem.scratch_bytes, mem.peak_bytes, cost.flops, cost.bytes_moved, objective, compute, load))
    pipeline = roofline.predict_step(costs, [streams_weights(g) for g in groups], ctx.device,
                                     prefetch_depth=ctx.prefetch_depth, warm=ctx.warm,
                                     kv_on_disk=ctx.kv_on_disk)
    return Plan(policy, budget_bytes, list(groups), rows, slab, sum(r.predicted_s for r in rows),
                pipeline.total_s)


# ---- validation -------------------------------------------------------------------------------------


def check_atomic_fits(stages: Sequence[Stage], ctx: PlanContext, budget_bytes: int) -> None:
    """Raise `InfeasibleBudget` if even the atomic grouping exceeds the budget in any pass."""
    name, atomic = _worst_atomic_pass(stages, ctx)
    if atomic.peak_bytes > budget_bytes:
        raise _infeasible(stages, ctx, budget_bytes, (name, atomic))


def _worst_atomic_pass(stages, ctx: PlanContext) -> tuple[str, Plan]:
    """(pass name, atomic plan) of the pass whose atomic grouping needs the most memory."""
    plans = [(pass_name(t, sc), account("atomic", [Group((s,)) for s in stages], ctx.for_pass(t, sc)))
             for t, sc in ((ctx.tokens, ctx.scoring),) + ctx.other_passes]
    return max(plans, key=lambda named: named[1].peak_bytes)


def _infeasible(stages, ctx: PlanContext, budget_bytes: int,
                worst_pass: tuple[str, Plan] | None = None) -> InfeasibleBudget:
    name, atomic = worst_pass or _worst_atomic_pass(stages, ctx)
    tokens = _pass_tokens(ctx, name)
    worst = max(atomic.rows, key=lambda r: r.peak_bytes)
    largest = max(atomic.rows, key=lambda r: r.weight_bytes if r.kind != "embed" else 0)
    need = atomic.peak_bytes
    hint = _finer_chunks_hint(ctx, largest, need, budget_bytes)
    if ctx.kv_ram_bytes:
        hint += (f"; {ctx.kv_ram_bytes / MB:.2f} MB of it is the KV cache held in RAM "
                 f"(cache=disk streams it in blocks)")
    hint += _prefill_block_hint("atomic", atomic.groups, ctx, name, tokens, budget_bytes)
    return InfeasibleBudget(
        f"schedule.budget_mb={budget_bytes / MB:.4g} is infeasible: stage {worst.group_id} alone "
        f"needs {worst.peak_bytes / MB:.2f} MB{_pass_words(name, tokens)} (its weights "
        f"{worst.weight_bytes / MB:.2f} MB, "
        f"activations {worst.activation_bytes / MB:.3f} MB, KV {worst.kv_bytes / MB:.3f} MB, "
        f"XLA temporaries {worst.scratch_bytes / MB:.3f} MB, "
        f"and {ctx.prefetch_depth} prefetch slab(s) of {atomic.slab_bytes / MB:.2f} MB for the "
        f"largest stage, {largest.group_id}). The smallest budget that works with these settings "
        f"is {math.ceil(need / MB * 100) / 100:g} MB{hint}.")


def _finer_chunks_hint(ctx: PlanContext, largest: PlanRow, need: int, budget: int) -> str:
    """What finer FFN or vocabulary chunks (or a shallower prefetch) would need instead: the
    largest stage sets the slab size, so cutting it shrinks depth + 1 slabs."""
    slabs = ctx.prefetch_depth + 1
    rest = need - slabs * largest.weight_bytes  # what does not scale with the largest stage
    parts = largest.stage_ids[0].split(".")
    hints = []
    for factor in (2, 4, 8, 16):
        est = rest + slabs * largest.weight_bytes / factor
        if parts[1:2] == ["ffn"]:
            setting = f"schedule.ffn_chunks={ctx.layout.n_ffn_chunks * factor}"
        elif parts[0] == "head":
            chunk = max(1, (ctx.layout.vocab_bounds[1] - ctx.layout.vocab_bounds[0]) // factor)
            setting = f"schedule.vocab_chunk={chunk}"
        else:
            break
        if est <= budget or factor == 16:
            hints.append(f"{setting} (about {est / MB:.2f} MB; other stages may then be the largest)")
            break
    if ctx.prefetch_depth:
        est = need - ctx.prefetch_depth * largest.weight_bytes
        hints.append(f"schedule.prefetch_depth=0 (about {est / MB:.2f} MB, slower)")
    return "; or try " + ", or ".join(hints) if hints else ""
