"""Training for the scaling-law experiment: tokenizer, data position, init, counts, the train
loop (loss decreases, bit-exact resume, refusing a foreign checkpoint) and the sweep configs."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from stagejax import data as data_files
from stagejax.models import Decoder
from stagejax.training import arch_sweep, architecture
from stagejax.training.checkpoint import Checkpointer
from stagejax.training.data import BatchSampler, eval_batches
from stagejax.training.run import to_settings
from stagejax.training.settings import (ArchSettings, BudgetSettings, DataSettings, EvalSettings,
                                        OptimSettings, TokenizerSettings, TrainSettings)
from stagejax.training.tokenizer_train import decode_ids, encode_text, load_corpus, train_bpe
from stagejax.training import train as train_module
from stagejax.training.train import Trainer, init_params_host, run_training

CONF = Path(__file__).resolve().parents[1] / "conf_train"
MINI_VOCAB = 300
# Prime-sized, like conf_train/model/tiny.yaml: 6 query heads of 10 over 2 KV heads, width 37.
TINY = ArchSettings(name="tiny", d_model=37, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=10,
                    ffn_ratio=1.44, ffn_multiple=1)


@pytest.fixture(scope="module")
def mini_corpus(tmp_path_factory):
    """A small corpus cut from the real pydocs splits, tokenized with a 300-id BPE."""
    root = tmp_path_factory.mktemp("data")
    (root / "mini").mkdir()
    sizes = {"train": 300_000, "valid": 40_000, "test": 40_000}
    for split, size in sizes.items():
        text = data_files.read_text(f"pydocs/{split}.txt")[:size]
        (root / "mini" / f"{split}.txt").write_text(text)
    cache = tmp_path_factory.mktemp("cache")
    corpus = load_corpus("mini", MINI_VOCAB, 2, data_dir=root, cache_dir=cache)
    return corpus, root, cache


def tiny_settings(root, cache, **budget) -> TrainSettings:
    settings = TrainSettings(
        model=TINY, tokenizer=TokenizerSettings(vocab_size=MINI_VOCAB),
        data=DataSettings(corpus="mini", seq_len=16, batch_size=4),
        optim=OptimSettings(lr=1e-2, warmup_frac=0.0),
        train=BudgetSettings(tokens=2 * 4 * 16, log_every=1, progress=False),
        eval=EvalSettings(max_tokens=512), seed=3)
    settings.paths.data, settings.paths.cache = str(root), str(cache)
    settings.tracking.mode = "disabled"
    for key, value in budget.items():
        setattr(settings.train, key, value)
    return settings


# ---- tokenizer -------------------------------------------------------------------------------

def test_tokenizer_round_trips_the_corpus():
    """Trained on 1 MB of the train split, the tokenizer maps that sample and the whole valid and
    test splits to ids and back without losing a byte."""
    train = data_files.read_text("pydocs/train.txt")[:1_000_000]
    tokenizer = train_bpe(train, 1024)
    assert tokenizer.vocab_size == 1024
    for text in (train, data_files.read_text("pydocs/valid.txt"),
                 data_files.read_text("pydocs/test.txt")):
        ids = encode_text(tokenizer, text)
        assert ids.max() < 1024
        assert len(ids) < len(text.encode()) / 2  # it did learn merges
        assert decode_ids(tokenizer, ids) == text


def test_corpus_cache_is_reused_and_round_trips(mini_corpus):
    corpus, root, cache = mini_corpus
    again = load_corpus("mini", MINI_VOCAB, 2, data_dir=root, cache_dir=cache)
    assert again.directory == corpus.directory
    for split in ("train", "valid", "test"):
        text = (root / "mini" / f"{split}.txt").read_text()
        assert decode_ids(again.tokenizer, again.tokens[split]) == text
        assert again.n_bytes[split] == len(text.encode())
    other = load_corpus("mini", MINI_VOCAB + 10, 2, data_dir=root, cache_dir=cache)
    assert other.directory != corpus.directory and other.vocab_size == MINI_VOCAB + 10


def test_bad_tokenizer_settings_are_refused():
    with pytest.raises(ValueError, match="tokenizer.vocab_size must be > 256"):
        TokenizerSettings(vocab_size=200)


# ---- data position ---------------------------------------------------------------------------

def test_sampler_resumes_exactly_across_epochs():
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = BatchSampler(tokens, batch_size=5, seq_len=7, seed=11)  # 142 windows: 28 batches
    for _ in range(40):  # into the second epoch
        sampler.next()
    state = json.loads(json.dumps(sampler.state()))  # as stored in a checkpoint
    expected = [sampler.next() for _ in range(30)]  # crosses the next epoch boundary too
    resumed = BatchSampler(tokens, batch_size=5, seq_len=7, seed=11)
    resumed.restore(state)
    for (x, y), (rx, ry) in zip(expected, (resumed.next() for _ in range(30))):
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted


def test_epoch_visits_every_window_once():
    tokens = np.arange(701, dtype=np.uint16)  # 100 windows of 7 targets
    sampler = BatchSampler(tokens, batch_size=10, seq_len=7, seed=0)
    firsts = np.concatenate([sampler.next()[0][:, 0] for _ in range(10)])
    assert sorted(firsts.tolist()) == list(range(0, 700, 7))


def test_eval_batches_pad_and_mask():
    tokens = np.arange(100, dtype=np.uint16)  # 14 windows of 7
    batches = list(eval_batches(tokens, batch_size=4, seq_len=7))
    assert len(batches) == 4
    assert [float(w.sum()) for _, _, w in batches] == [4, 4, 4, 2]
    assert batches[-1][0].shape == (4, 7)


# ---- model: init and counts ------------------------------------------------------------------

def test_host_init_matches_the_flax_initializers():
    config = architecture.model_config(TINY, 4096, 16)
    trainer_model = Decoder(config)
    ours = init_params_host(trainer_model, seed=0)
    # A jitted init with the rbg generator: the default threefry's init takes 6-12 s to compile
    # here, and only the distributions are compared.
    key = jax.random.key(0, impl="unsafe_rbg")
    flax = jax.jit(trainer_model.init)(key, np.zeros((1, 1), np.int32))["params"]
    flat_ours = dict(jax.tree_util.tree_flatten_with_path(ours)[0])
    flat_flax = dict(jax.tree_util.tree_flatten_with_path(flax)[0])
    assert flat_ours.keys() == flat_flax.keys()
    for path, theirs in flat_flax.items():
        mine = np.asarray(flat_ours[path])
        theirs = np.asarray(theirs)
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype, path
        if np.all(theirs == theirs.flat[0]):  # a constant initializer (norm scales)
            np.testing.assert_array_equal(mine, theirs)
        else:  # the same normal distribution, a different draw
            assert abs(mine.std() / theirs.std() - 1) < 0.1, path
            assert abs(mine.mean()) < 3 * theirs.std() / np.sqrt(mine.size), path
    again = init_params_host(trainer_model, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(again)))


@pytest.mark.parametrize("tie,experts,qk_norm", [(True, 1, False), (False, 1, False),
                                                 (True, 4, False), (True, 1, True)])
def test_param_counts_match_the_model(tie, experts, qk_norm):
    arch = dataclasses.replace(TINY, tie_embeddings=tie, n_experts=experts,
                               top_k=2 if experts > 1 else 1, qk_norm=qk_norm)
    config = architecture.model_config(arch, MINI_VOCAB, 16)
    assert config.traits.qk_norm == qk_norm
    model = Decoder(config)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 1), np.int32))
    total = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    counts = architecture.param_counts(config)
    assert counts["total"] == total
    assert counts["embedding"] == MINI_VOCAB * 37 * (1 if tie else 2)
    # active: the K routed experts of each layer, without the others (the router is active)
    expert = 3 * 37 * config.ffn_dim
    inactive = TINY.n_layers * expert * (experts - arch.top_k)
    assert counts["active"] == total - inactive
    assert counts["non_embedding_active"] == counts["non_embedding"] - inactive


# ---- the training loop -----------------------------------------------------------------------

@pytest.mark.parametrize("qk_norm", [False, True])
def test_two_steps_decrease_the_loss(mini_corpus, qk_norm):
    """Two steps lower the loss, with the Llama layer and with QK-norm (the Qwen3 family's:
    the same `Block` the inference path imports Qwen3 into)."""
    corpus, root, cache = mini_corpus
    settings = tiny_settings(root, cache)
    settings.model = dataclasses.replace(settings.model, qk_norm=qk_norm)
    trainer = Trainer(settings, corpus.vocab_size)
    assert ("q_norm" in trainer.init_state()["params"]["L0"]) == qk_norm
    state = trainer.init_state()
    before = trainer.evaluate(state["params"], corpus.tokens["valid"])["loss"]
    sampler = BatchSampler(corpus.tokens["train"], 4, 16, settings.seed)
    for _ in range(2):
        state, stats = trainer.step(state, *sampler.next())
    after = trainer.evaluate(state["params"], corpus.tokens["valid"])["loss"]
    assert int(state["step"]) == 2
    assert after < before - 0.05, (before, after)
    # The analytic FLOP count agrees with XLA's count of the compiled step (which also counts
    # norms, activations and the AdamW update): within 25% on this tiny model.
    exact = architecture.training_flops(trainer.config, 16, 4 * 16)["flops_exact"]
    assert 0.75 < trainer.flops_xla_per_step / exact < 1.25, (trainer.flops_xla_per_step, exact)


def test_two_moe_steps_decrease_the_loss(mini_corpus):
    """A mixture of experts (4 experts, 2 per token, GQA) trains: two steps lower the loss, the
    load-balancing term is reported, and XLA's FLOP count of the step agrees with the analytic
    one (the routed experts and the router): within 25% as for dense, plus the padding rows
    of the expert blocks, which the analytic count leaves out (here 160 rows computed for
    128 assignments per layer, `moe.default_block_rows`)."""
    corpus, root, cache = mini_corpus
    settings = tiny_settings(root, cache)
    settings.model = dataclasses.replace(TINY, n_experts=4, top_k=2, ffn_ratio=1.44 * 2)
    trainer = Trainer(settings, corpus.vocab_size)
    assert trainer.config.is_moe and trainer.config.ffn_dim == TINY.ffn_dim
    state = trainer.init_state()
    before = trainer.evaluate(state["params"], corpus.tokens["valid"])["loss"]
    sampler = BatchSampler(corpus.tokens["train"], 4, 16, settings.seed)
    for _ in range(2):
        state, stats = trainer.step(state, *sampler.next())
        assert 1.0 <= float(stats["load_balance"]) <= 4.0
    after = trainer.evaluate(state["params"], corpus.tokens["valid"])["loss"]
    assert after < before - 0.05, (before, after)
    exact = architecture.training_flops(trainer.config, 16, 4 * 16)["flops_exact"]
    assert 0.75 < trainer.flops_xla_per_step / exact < 1.25 * 160 / 128, (
        trainer.flops_xla_per_step, exact)


def restored_params(run_dir: Path, like):
    checkpointer = Checkpointer(run_dir / "checkpoints")
    try:
        state, data_state, meta = checkpointer.restore(checkpointer.latest_step(), like)
    finally:
        checkpointer.close()
    return state, data_state, meta


def test_resume_is_bit_exact(mini_corpus, tmp_path):
    """2 steps straight == 1 step, checkpoint, a new process's worth of objects, 1 more step:
    identical parameters, optimizer state, data position, losses and final metrics."""
    corpus, root, cache = mini_corpus
    settings = tiny_settings(root, cache)
    straight = run_training(settings, tmp_path / "straight", corpus=corpus)
    assert run_training(settings, tmp_path / "resumed", corpus=corpus, stop_after=1) == {}
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    train_module._EXECUTABLES.clear()  # compile afresh, as a resuming process would
    resumed = run_training(settings, tmp_path / "resumed", corpus=corpus)
    assert resumed["resumed_from_step"] == 1 and straight["resumed_from_step"] is None

    like = Trainer(settings, corpus.vocab_size).abstract_state()  # nothing compiled
    a_state, a_data, a_meta = restored_params(tmp_path / "straight", like)
    b_state, b_data, b_meta = restored_params(tmp_path / "resumed", like)
    leaves_a, leaves_b = jax.tree.leaves(a_state), jax.tree.leaves(b_state)
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a_data == b_data
    assert [r["loss"] for r in a_meta["history"]] == [r["loss"] for r in b_meta["history"]]
    for key in ("train_loss", "valid_loss", "test_loss", "tokens_seen", "n_params_total",
                "n_params_non_embedding", "flops_6nd", "flops_exact"):
        assert straight[key] == resumed[key], key

    again = run_training(settings, tmp_path / "resumed", corpus=corpus)  # finished: not redone
    assert again == json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert again["wall_s"] == resumed["wall_s"]

    history = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [row["step"] for row in history] == [1, 2]
    assert (tmp_path / "resumed" / "history.csv").read_text().startswith("step,tokens,lr,loss")
    assert straight["tokens_seen"] == 128 and straight["steps"] == 2
    assert straight["flops_6nd"] == 6 * straight["n_params_non_embedding"] * 128


def test_resume_refuses_a_checkpoint_of_other_settings(mini_corpus, tmp_path):
    corpus, root, cache = mini_corpus
    settings = tiny_settings(root, cache)
    run_training(settings, tmp_path / "run", corpus=corpus, stop_after=1)
    other = tiny_settings(root, cache)
    other.optim.lr = 2e-2
    with pytest.raises(ValueError, match=r"different settings \(optim\)"):
        run_training(other, tmp_path / "run", corpus=corpus)
    settings.checkpoint.resume = False
    with pytest.raises(ValueError, match="checkpoint.resume is false"):
        run_training(settings, tmp_path / "run", corpus=corpus)


# ---- the sweep configs -----------------------------------------------------------------------

def compose_train(overrides=(), hydra_config=False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides),
                       return_hydra_config=hydra_config)


def sweep_axes(preset: str) -> dict:
    """A preset's multirun axes {key: [values]}: hydra's basic sweeper runs their product."""
    params = compose_train([f"experiment={preset}"], hydra_config=True).hydra.sweeper.params
    return {key: str(values).split(",") for key, values in params.items()}


def test_default_and_every_model_compose():
    assert isinstance(to_settings(compose_train()), TrainSettings)
    for option in sorted(p.stem for p in (CONF / "model").glob("*.yaml")):
        settings = to_settings(compose_train([f"model={option}"]))
        assert settings.model.name == option


@pytest.mark.parametrize("preset,min_models,min_span", [("quick", 6, 10.0), ("full", 10, 100.0)])
def test_sweep_presets_compose(preset, min_models, min_span):
    axes = sweep_axes(preset)
    assert set(axes) == {"model", "train.tokens"}
    # Each value of every axis composes (with the other axis at its first value): every job of
    # the product then composes too, the axes being independent keys.
    jobs = [[f"model={m}", f"train.tokens={axes['train.tokens'][0]}"] for m in axes["model"]]
    jobs += [[f"model={axes['model'][0]}", f"train.tokens={t}"] for t in axes["train.tokens"][1:]]
    settings = [to_settings(compose_train([f"experiment={preset}", *job])) for job in jobs]
    n = {s.model.name: architecture.param_counts(architecture.model_config(
        s.model, s.tokenizer.vocab_size, s.data.seq_len))["non_embedding"] for s in settings}
    budgets = {s.train.tokens for s in settings}
    assert len(n) >= min_models and max(n.values()) / min(n.values()) >= min_span
    assert len(budgets) >= 2
    # depth, width, FFN ratio and KV heads each take several values across the sweep
    for field in ("n_layers", "d_model", "ffn_ratio", "n_kv_heads"):
        assert len({getattr(s.model, field) for s in settings}) >= 3, field


@pytest.mark.parametrize("override,message", [
    ("model.n_kv_heads=3", r"model.n_heads \(4\) must be a multiple of model.n_kv_heads \(3\)"),
    ("train.tokens=0", "train.tokens must be a positive number"),
    ("optim.warmup_frac=1.5", r"optim.warmup_frac must be in \[0, 1\)"),
    ("tokenizer.vocab_size=100000", "tokenizer.vocab_size must be <= 65535"),
])
def test_bad_values_get_a_clear_error(override, message):
    with pytest.raises(ValueError, match=message):
        to_settings(compose_train([override]))


# ---- the fit over a sweep --------------------------------------------------------------------

def write_synthetic_sweep(root: Path, law) -> None:
    """metrics.json files of a made-up sweep whose test losses follow `law` exactly."""
    for i, n in enumerate((10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000)):
        for d in (50_000, 150_000):
            run = root / f"{i}-m{i}-D{d}"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps({
                "model": f"m{i}", "n_params_non_embedding": n, "n_params_total": n + 131_072,
                "tokens_seen": d, "test_loss": float(law(n, d)), "valid_loss": 0.0,
                "vocab_size": 4096, "seed": 0}))


def test_fit_and_pareto_recovers_a_known_law(tmp_path):
    from importlib import util

    from stagejax.fitting import ChinchillaLaw, load_loss_model
    from stagejax.training.sweep import collect_runs, fit_sweep

    law = ChinchillaLaw(E=2.0, A=30.0, B=400.0, alpha=0.3, beta=0.35)
    write_synthetic_sweep(tmp_path / "sweep", law)
    fit = fit_sweep(collect_runs([tmp_path / "sweep"]), holdout_largest=1)
    assert fit.law_n_tokens == 150_000 and fit.law_n.n_points == 5 and fit.law_n.n_holdout == 1
    assert fit.law_nd.n_points == 10 and fit.law_nd.n_holdout == 2
    assert fit.law_nd.holdout_error < 1e-3  # the held-out largest model is predicted
    # alpha is identified; with two budgets E, B and beta trade off against each other.
    assert abs(fit.law_nd.model.alpha - 0.3) < 0.02

    spec = util.spec_from_file_location(
        "fit_and_pareto", Path(__file__).resolve().parents[1] / "experiments/scaling/fit_and_pareto.py")
    script = util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out")]) == 0
    for name in ("fit.json", "fit.md", "loss_vs_n.png", "loss_n.json", "loss_nd.json",
                 "pareto.md", "pareto.csv"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert load_loss_model(tmp_path / "out" / "loss_nd.json") == fit.law_nd.model
    pareto = (tmp_path / "out" / "pareto.md").read_text()
    assert "## jetson_orin_nano" in pareto and "## raspberry_pi_5" in pareto


def test_collect_runs_refuses_mixed_sweeps(tmp_path):
    from stagejax.training.sweep import collect_runs

    law = lambda n, d: 3.0  # noqa: E731
    write_synthetic_sweep(tmp_path / "a", law)
    write_synthetic_sweep(tmp_path / "b", law)
    with pytest.raises(ValueError, match="are the same run"):
        collect_runs([tmp_path / "a", tmp_path / "b"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no training metrics.json"):
        collect_runs([tmp_path / "empty"])


def test_arch_law_generator_reproduces_the_committed_sweep(tmp_path):
    """The committed sweep files are the generator's output; every run composes, with the
    architecture its name says and a valid training config."""
    assert arch_sweep.main(["--check"]) == 0
    design = arch_sweep.load_design()
    runs = sweep_axes("arch_law")["+arch_law"]
    assert runs == [r["name"] for r in design["runs"]]
    assert set(design["holdout"]) <= {r["architecture"] for r in design["runs"]}
    for run in design["runs"]:
        settings = to_settings(compose_train(["experiment=arch_law", f"+arch_law={run['name']}"]))
        m = settings.model
        assert (m.name, m.n_layers, m.d_model, m.ffn_ratio, m.n_experts, m.top_k, m.n_kv_heads,
                settings.seed) == (run["name"], run["depth"], run["width"], run["ffn_ratio"],
                                   run["n_experts"], run["top_k"], run["n_kv_heads"], run["seed"])
    # a changed or missing file is reported
    arch_sweep.main(["--out", str(tmp_path)])
    (tmp_path / "arch_law" / f"{runs[0]}.yaml").write_text("model: {}\n")
    assert arch_sweep.main(["--check", "--out", str(tmp_path)]) == 1
    # the cluster design is larger and also free of duplicates
    cluster, _ = arch_sweep.sweep(arch_sweep.SCALES["cluster"])
    assert len({p.architecture for p in cluster}) > len({r["architecture"] for r in design["runs"]})


def test_arch_law_script_checks_and_fits_a_known_law(tmp_path):
    """experiments/arch_law.py on made-up runs of the committed design whose losses follow a
    known law plus seed noise: the checks pass, the held-out runs are predicted, the depth
    exponent comes back, the report and figures are written. And a sweep without a width effect
    is reported inconclusive."""
    from importlib import util

    from stagejax.architecture_law import ArchitectureLaw

    spec = util.spec_from_file_location(
        "arch_law", Path(__file__).resolve().parents[1] / "experiments/arch_law.py")
    script = util.module_from_spec(spec)
    spec.loader.exec_module(script)
    law = ArchitectureLaw(kappa_l=2.0, alpha_l=1.0, kappa_rho=0.05, alpha_rho=1.0, beta1=0.0,
                          kappa_d=40.0, beta2=0.8, alpha_r=0.2, kappa_m=0.2, alpha_m=0.05,
                          L_inf=3.0)
    design = arch_sweep.load_design()
    rng = np.random.default_rng(0)

    def write_runs(root: Path, loss_of) -> None:
        for run in design["runs"]:
            directory = root / run["name"]
            directory.mkdir(parents=True)
            ffn_dim = round(run["ffn_ratio"] / run["top_k"] * run["width"])
            (directory / "metrics.json").write_text(json.dumps({
                "model": run["name"], "seed": run["seed"], "n_layers": run["depth"],
                "d_model": run["width"], "ffn_dim": ffn_dim, "top_k": run["top_k"],
                "n_experts": run["n_experts"], "n_kv_heads": run["n_kv_heads"], "head_dim": 32,
                "tokens_seen": design["scale"]["tokens"], "tokens_budget": design["scale"]["tokens"],
                "valid_loss": loss_of(run) + rng.normal(0, 0.008),
                "test_loss": 0.0, "train_loss": 0.0, "n_params_active": 1,
                "n_params_non_embedding_active": 1, "n_params_non_embedding": 1,
                "train_s": 1.0, "wall_s": 1.0}))

    write_runs(tmp_path / "runs", lambda r: law(r["depth"], r["width"], r["ffn_ratio"],
                                                r["top_k"] / r["n_experts"], r["n_kv_heads"] * 32))
    args = ["--no-train", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
            "--bootstrap", "8", "--front-r", "1"]
    assert script.main(args) == 0
    sanity = json.loads((tmp_path / "out" / "sanity.json").read_text())
    assert sanity["conclusive"] and 0.004 < sanity["seed_noise"] < 0.016
    assert "kappa_m" in sanity["fixed"]  # the KV term moves the loss less than the noise
    fit = json.loads((tmp_path / "out" / "fit.json").read_text())
    assert fit["r2_holdout"] > 0.9 and abs(fit["law"]["params"]["alpha_l"] - 1.0) < 0.3
    for name in ("report.md", "runs.csv", "fronts.csv", "loss_vs_variables.png",
                 "predicted_vs_observed.png", "residuals.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    write_runs(tmp_path / "flat", lambda r: 4.0 + 1.0 / r["depth"])  # no width effect
    assert script.main(["--no-train", "--runs", str(tmp_path / "flat"), "--out",
                        str(tmp_path / "flat_out"), "--bootstrap", "0", "--front-r", "1"]) == 0
    assert "INCONCLUSIVE" in (tmp_path / "flat_out" / "report.md").read_text()
