"""Training one Llama-family model from scratch: the Python API under the hydra entry.

`run_training(settings, out_dir)` trains the `stagejax.models.Decoder` described by
`settings.model` on the corpus's train split for `settings.train.tokens` tokens (AdamW, linear
warmup then cosine decay, global-norm clipping; optax), then scores the final parameters on the
train, valid and test splits. Into `out_dir` it writes, each atomically:
  - `metrics.json` — parameter counts (non-embedding N and total), tokens seen D, training FLOPs
    (6 N D, the exact count, and XLA's count of the compiled step), train/valid/test loss (nats
    per token, and test bits per byte), wall, compile, train and eval times;
  - `history.json`, `history.csv` — the loss curve: one row per `train.log_every` steps;
  - `train_settings.json` — the resolved settings;
  - `checkpoints/` — orbax checkpoints (`stagejax.training.checkpoint`), from which a rerun in the
    same directory resumes bit-exactly (same parameters, losses and batches as without the stop).

The loss is the mean token cross-entropy, written with `stagejax.models.ops.log_softmax`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stagejax.models import ops
from stagejax.models import Decoder
from stagejax.models.layers import INIT_STDDEV
from stagejax_device.results import atomic_write_json, atomic_write_text
from stagejax.training.architecture import model_config, param_counts, training_flops
from stagejax.training.checkpoint import Checkpointer
from stagejax.training.data import BatchSampler, eval_batches
from stagejax.training.settings import OptimSettings, TrainSettings
from stagejax.training.tokenizer_train import TokenizedCorpus, load_corpus

# Compiled train/eval steps by `Trainer._executable_key`: compiling a train step takes 3-8 s
# here, so a run resumed in the same process (or a test's second run) reuses its executables.
# A sweep's jobs all differ, so only the last few are kept.
_EXECUTABLES: dict = {}
_EXECUTABLES_KEPT = 2

HISTORY_FIELDS = ("step", "tokens", "lr", "loss", "load_balance", "grad_norm", "valid_loss",
                  "elapsed_s")


def total_steps(settings: TrainSettings) -> int:
    """Steps that see at least `train.tokens` target tokens."""
    return math.ceil(settings.train.tokens / (settings.data.batch_size * settings.data.seq_len))


def lr_schedule(optim: OptimSettings, steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_frac` of the steps, then cosine decay to `lr * min_lr_frac`."""
    warmup = int(optim.warmup_frac * steps)
    end = optim.lr * optim.min_lr_frac
    if warmup == 0:
        return optax.cosine_decay_schedule(optim.lr, max(1, steps), alpha=optim.min_lr_frac)
    return optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, max(steps, warmup + 1), end)


def make_optimizer(optim: OptimSettings, steps: int) -> optax.GradientTransformation:
    """AdamW (decay on matrices only, not on norm scales) after global-norm clipping."""
    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    adamw = optax.adamw(lr_schedule(optim, steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=decay_mask)
    if optim.grad_clip == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)


def token_nll(logits_BTV, targets_BT):
    """Negative log-likelihood of each target token [B, T], float32."""
    vocab = logits_BTV.shape[-1]
    # A one-hot contraction rather than take_along_axis: its gradient is a dense multiply
    # instead of a scatter, ~1.4x faster per step here at V = 4096.
    return -jnp.sum(ops.log_softmax(logits_BTV) * jax.nn.one_hot(targets_BT, vocab), axis=-1)


def load_balance(sown: dict):
    """The mean over layers of the load-balancing losses the layers sowed (`Block.experts`);
    0 for a dense model."""
    losses = jax.tree.leaves(sown.get("intermediates", {}))
    return jnp.mean(jnp.stack(losses)) if losses else jnp.zeros((), jnp.float32)


class Trainer:
    """The compiled train and eval steps of one run, and its initial state.

    The state is a dict pytree {"params", "opt_state", "step"}; `step` donates it, so the caller
    must use the returned state and drop the one passed in. Both executables are compiled ahead
    of time by `compile()` (or on first use), which sets `compile_s` and `flops_xla_per_step`.
    """

    def __init__(self, settings: TrainSettings, vocab_size: int):
        self.settings = settings
        self.config = model_config(settings.model, vocab_size, settings.data.seq_len)
        self.model = Decoder(self.config)
        self.steps = total_steps(settings)
        self.schedule = lr_schedule(settings.optim, self.steps)
        self.optimizer = make_optimizer(settings.optim, self.steps)
        self._train_step = self._eval_step = None
        self.compile_s = 0.0
        self.flops_xla_per_step: float | None = None

    def compile(self) -> None:
        """Compile the train and eval steps (once; reused from `_EXECUTABLES` if present)."""
        if self._train_step is not None:
            return
        key = self._executable_key()
        if key in _EXECUTABLES:  # same math and shapes: a resume or rerun in this process
            self._train_step, self._eval_step, self.flops_xla_per_step = _EXECUTABLES[key]
            return
        self._train_step = self._compile_train_step()
        self._eval_step = self._compile_eval_step()
        while len(_EXECUTABLES) >= _EXECUTABLES_KEPT:
            _EXECUTABLES.pop(next(iter(_EXECUTABLES)))
        _EXECUTABLES[key] = (self._train_step, self._eval_step, self.flops_xla_per_step)

    def _executable_key(self) -> str:
        """What the compiled steps depend on: the architecture, batch shape, optimizer settings
        and step count (the schedule's length)."""
        s = self.settings
        return json.dumps([dataclasses.asdict(self.config), dataclasses.asdict(s.data),
                           dataclasses.asdict(s.optim), s.model.load_balance_coef, self.steps],
                          sort_keys=True)

    def abstract_state(self) -> dict:
        """Shapes and dtypes of the state (a tree of `jax.ShapeDtypeStruct`), nothing computed."""
        return jax.eval_shape(self.init_state)

    def init_state(self) -> dict:
        params = init_params_host(self.model, self.settings.seed)
        return {"params": params, "opt_state": self.optimizer.init(params),
                "step": jnp.zeros((), jnp.int32)}

    def _batch_shape(self):
        return jax.ShapeDtypeStruct((self.settings.data.batch_size, self.settings.data.seq_len),
                                    jnp.int32)

    def _compile_train_step(self):
        model, optimizer, schedule = self.model, self.optimizer, self.schedule

        balance_coef = self.settings.model.load_balance_coef

        def loss_fn(params, inputs_BT, targets_BT):
            (logits_BTV, _), sown = model.apply({"params": params}, inputs_BT,
                                                mutable=["intermediates"])
            nll = jnp.mean(token_nll(logits_BTV, targets_BT))
            balance = load_balance(sown)
            return nll + balance_coef * balance, (nll, balance)

        def train_step(state, inputs_BT, targets_BT):
            (_, (loss, balance)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state["params"], inputs_BT, targets_BT)
            updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
            # The rate this update used (optax's count equals our step), computed here rather
            # than eagerly on the host, where each schedule call would dispatch jax ops.
            stats = {"loss": loss, "load_balance": balance, "grad_norm": optax.tree.norm(grads),
                     "lr": schedule(state["step"])}
            return new_state, stats

        abstract_state = self.abstract_state()
        self._abstract_params = abstract_state["params"]
        start = time.perf_counter()
        lowered = jax.jit(train_step, donate_argnums=0).lower(
            abstract_state, self._batch_shape(), self._batch_shape())
        compiled = lowered.compile()
        self.compile_s += time.perf_counter() - start
        self.flops_xla_per_step = _xla_flops(compiled)
        return compiled

    def _compile_eval_step(self):
        model = self.model

        def eval_step(params, inputs_BT, targets_BT, weights_B):
            logits_BTV, _ = model.apply({"params": params}, inputs_BT)
            nll_BT = token_nll(logits_BTV, targets_BT)
            return jnp.sum(nll_BT * weights_B[:, None]), jnp.sum(weights_B) * nll_BT.shape[1]

        abstract_params = self._abstract_params
        weights = jax.ShapeDtypeStruct((self.settings.data.batch_size,), jnp.float32)
        start = time.perf_counter()
        compiled = jax.jit(eval_step).lower(abstract_params, self._batch_shape(),
                                            self._batch_shape(), weights).compile()
        self.compile_s += time.perf_counter() - start
        return compiled

    def step(self, state: dict, inputs_BT: np.ndarray, targets_BT: np.ndarray):
        """One optimizer step: (new state, {"loss", "load_balance", "grad_norm", "lr"} as
        device scalars; "loss" is the cross-entropy, without the load-balancing term)."""
        self.compile()
        return self._train_step(state, inputs_BT, targets_BT)

    def evaluate(self, params, tokens: np.ndarray, max_tokens: int | None = None) -> dict:
        """Mean NLL (nats per token) of `params` over the first `max_tokens` targets of a split
        (all of it if None), scored in windows of `seq_len`."""
        self.compile()
        total, count = 0.0, 0.0
        d = self.settings.data
        for inputs, targets, weights in eval_batches(tokens, d.batch_size, d.seq_len, max_tokens):
            nll_sum, n = self._eval_step(params, inputs, targets, weights)
            total += float(nll_sum)
            count += float(n)
        return {"loss": total / count, "tokens": int(count)}


def init_params_host(model: Decoder, seed: int) -> dict:
    """The Decoder's initial parameters drawn on the host with numpy, deterministic in `seed`.

    Same distributions as the Flax initializers of `stagejax.models` (matrices and embeddings
    normal(0, INIT_STDDEV), norm scales one, biases zero; a test checks every leaf against
    `model.init`), without compiling `model.init`: XLA's threefry code made that compile take
    6-15 s per architecture here, more than some whole runs of the quick sweep.
    """
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    values = []
    for index, (path, leaf) in enumerate(leaves):
        name = path[-1].key
        if name == "scale":
            value = np.ones(leaf.shape, leaf.dtype)
        elif name == "bias":
            value = np.zeros(leaf.shape, leaf.dtype)
        else:
            rng = np.random.default_rng([seed, index])  # one stream per leaf, in tree order
            value = (rng.standard_normal(leaf.shape, np.float32) * INIT_STDDEV).astype(leaf.dtype)
        values.append(jnp.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, values)


def _xla_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled executable by XLA's cost analysis (None if unavailable)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per device
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def trajectory_fingerprint(settings: TrainSettings) -> dict:
    """The settings that determine the training trajectory: a checkpoint made under different
    ones must not be resumed."""
    return {"model": dataclasses.asdict(settings.model),
            "tokenizer": dataclasses.asdict(settings.tokenizer),
            "data": dataclasses.asdict(settings.data),
            "optim": dataclasses.asdict(settings.optim),
            "tokens": settings.train.tokens, "eval_every": settings.eval.every,
            "eval_during_tokens": settings.eval.during_tokens, "seed": settings.seed}


def write_history(out_dir: Path, history: list[dict]) -> None:
    atomic_write_json(out_dir / "history.json", history)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(out_dir / "history.csv", buffer.getvalue())


def run_training(settings: TrainSettings, out_dir: str | Path, *,
                 corpus: TokenizedCorpus | None = None, stop_after: int | None = None) -> dict:
    """Train (or resume) one run in `out_dir`; returns its metrics (also in metrics.json).

    Args:
      settings: the run's settings.
      out_dir: the run directory; its latest checkpoint, if any, is resumed (an error if
        `checkpoint.resume` is false, or if it was made under settings that change the
        trajectory); a run found finished there (final checkpoint and metrics.json) is not
        repeated: its metrics are returned.
      corpus: the tokenized corpus, if the caller already loaded it (a sweep in one process).
      stop_after: stop (with a checkpoint) once this many steps are done in total, without the
        final evaluation: a preemption on purpose; a later call resumes. Returns {} then.
    """
    wall_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        corpus = load_corpus(settings.data.corpus, settings.tokenizer.vocab_size,
                             settings.tokenizer.min_frequency, settings.paths.data,
                             settings.paths.cache)
    checkpointer = Checkpointer(out_dir / "checkpoints", settings.checkpoint.keep)
    fingerprint = trajectory_fingerprint(settings)
    try:
        latest = _resumable_step(checkpointer, settings, fingerprint)
    except BaseException:
        checkpointer.close()
        raise
    if latest == total_steps(settings) and (out_dir / "metrics.json").is_file():
        # A finished run (e.g. a killed sweep rerun in its own directory): nothing to redo.
        checkpointer.close()
        return json.loads((out_dir / "metrics.json").read_text())
    atomic_write_json(out_dir / "train_settings.json", settings.to_dict())
    trainer = Trainer(settings, corpus.vocab_size)
    trainer.compile()
    sampler = BatchSampler(corpus.tokens["train"], settings.data.batch_size,
                           settings.data.seq_len, settings.seed)
    state = trainer.init_state()
    history: list[dict] = []
    # Batch losses since the last history row, kept on the device (no sync per step); saved in
    # a checkpoint so a resumed run's next row averages the same steps as without the stop.
    pending_losses: list = []
    elapsed_before = 0.0
    resumed_from = None
    if latest is not None:
        state, data_state, meta = checkpointer.restore(latest, state)
        sampler.restore(data_state)
        history, elapsed_before, resumed_from = meta["history"], meta["elapsed_s"], latest
        pending_losses.extend(meta["pending_losses"])

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - wall_start

    def save(step: int) -> None:
        checkpointer.save(step, state, sampler.state(),
                          {"fingerprint": fingerprint, "history": history, "elapsed_s": elapsed(),
                           "pending_losses": [float(x) for x in pending_losses]})

    steps, log_every = trainer.steps, settings.train.log_every
    step = int(state["step"])
    end_step = steps if stop_after is None else min(steps, stop_after)
    train_s = 0.0
    progress = _progress_bar(settings, steps, step)
    try:
        while step < end_step:
            start = time.perf_counter()
            inputs, targets = sampler.next()
            state, stats = trainer.step(state, inputs, targets)
            pending_losses.append(stats["loss"])
            step += 1
            if step % log_every == 0 or step == steps:
                row = {"step": step, "tokens": step * settings.data.batch_size * settings.data.seq_len,
                       "lr": float(stats["lr"]),
                       "loss": float(np.mean([float(x) for x in pending_losses])),
                       "load_balance": float(stats["load_balance"]),
                       "grad_norm": float(stats["grad_norm"]), "valid_loss": None}
                pending_losses.clear()
                train_s += time.perf_counter() - start
                if settings.eval.every and step % settings.eval.every == 0:
                    row["valid_loss"] = trainer.evaluate(state["params"], corpus.tokens["valid"],
                                                         settings.eval.during_tokens)["loss"]
                row["elapsed_s"] = elapsed()
                history.append(row)
                write_history(out_dir, history)
                if progress is not None:
                    progress.set_postfix(loss=f"{row['loss']:.3f}")
            else:
                train_s += time.perf_counter() - start
            if progress is not None:
                progress.update(1)
            if settings.checkpoint.every and step % settings.checkpoint.every == 0:
                save(step)
        # Wait for the last dispatched step, so train_s covers its compute.
        start = time.perf_counter()
        jax.block_until_ready(state)
        train_s += time.perf_counter() - start
    finally:
        if progress is not None:
            progress.close()
    if checkpointer.latest_step() != step:
        save(step)
    checkpointer.close()
    if step < steps:  # stopped on purpose: the next call resumes
        return {}

    eval_start = time.perf_counter()
    final = {split: trainer.evaluate(state["params"], corpus.tokens[split], settings.eval.max_tokens)
             for split in ("train", "valid", "test")}
    eval_s = time.perf_counter() - eval_start
    tokens_seen = steps * settings.data.batch_size * settings.data.seq_len
    counts = param_counts(trainer.config)
    flops = training_flops(trainer.config, settings.data.seq_len, tokens_seen)
    test_bpb = final["test"]["loss"] / math.log(2) / corpus.bytes_per_token("test")
    metrics = {
        "model": settings.model.name, "family": trainer.config.family,
        "d_model": trainer.config.d_model, "n_layers": trainer.config.n_layers,
        "n_heads": trainer.config.n_heads, "n_kv_heads": trainer.config.n_kv_heads,
        "head_dim": trainer.config.head_dim, "ffn_dim": trainer.config.ffn_dim,
        "ffn_ratio": settings.model.ffn_ratio, "vocab_size": trainer.config.vocab_size,
        "seq_len": settings.data.seq_len, "batch_size": settings.data.batch_size,
        "n_experts": trainer.config.n_experts, "top_k": trainer.config.experts_per_token,
        "load_balance_coef": settings.model.load_balance_coef,
        "n_params_non_embedding": counts["non_embedding"],
        "n_params_non_embedding_active": counts["non_embedding_active"],
        "n_params_embedding": counts["embedding"], "n_params_total": counts["total"],
        "n_params_active": counts["active"],
        "tokens_budget": settings.train.tokens, "tokens_seen": tokens_seen, "steps": steps,
        **flops,
        "flops_xla_per_step": trainer.flops_xla_per_step,
        "flops_xla": (None if trainer.flops_xla_per_step is None
                      else trainer.flops_xla_per_step * steps),
        "train_loss": final["train"]["loss"], "valid_loss": final["valid"]["loss"],
        "test_loss": final["test"]["loss"], "test_bits_per_byte": test_bpb,
        "eval_tokens": {split: final[split]["tokens"] for split in final},
        "train_loss_last_logged": history[-1]["loss"] if history else None,
        "lr": settings.optim.lr, "seed": settings.seed,
        # Times of this session only: a resumed run counts the steps it ran itself.
        "compile_s": trainer.compile_s, "train_s": train_s, "eval_s": eval_s,
        "train_tokens_per_s": (
            (steps - (resumed_from or 0)) * settings.data.batch_size * settings.data.seq_len
            / train_s if train_s > 0 else None),
        "resumed_from_step": resumed_from, "tokenizer_dir": str(corpus.directory),
    }
    metrics["wall_s"] = elapsed()
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def _resumable_step(checkpointer: Checkpointer, settings: TrainSettings,
                    fingerprint: dict) -> int | None:
    """The step to resume from (None: start afresh), checked before anything is compiled."""
    latest = checkpointer.latest_step()
    if latest is None:
        return None
    where = checkpointer.directory
    if not settings.checkpoint.resume:
        raise ValueError(f"{where} already holds a checkpoint (step {latest}) and "
                         "checkpoint.resume is false; use a new run directory")
    saved = checkpointer.read_meta(latest)["fingerprint"]
    if saved != fingerprint:
        changed = sorted(k for k in fingerprint if saved.get(k) != fingerprint[k])
        raise ValueError(f"{where} was saved by a run with different settings "
                         f"({', '.join(changed)}); use a new run directory")
    return latest


def _progress_bar(settings: TrainSettings, steps: int, initial: int):
    if not settings.train.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=steps, initial=initial, desc=settings.model.name, unit="step",
                dynamic_ncols=True, leave=False)
