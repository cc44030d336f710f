"""The README's Python example works as written (on the tiny model, for speed)."""

import stagejax


def test_api_generate_and_perplexity():
    model = stagejax.load_model("tiny")
    result = stagejax.generate(model, "Hello", max_new_tokens=6)
    assert len(result.new_ids) == 6 and isinstance(result.text, str)
    sampled = stagejax.generate(model, "Hello", max_new_tokens=6, temperature=1.0, seed=3)
    again = stagejax.generate(model, "Hello", max_new_tokens=6, temperature=1.0, seed=3)
    assert sampled.new_ids == again.new_ids
    text = "A line of text for the tiny model to score. " * 20
    llama = stagejax.perplexity(model, text, n_ctx=64, n_chunks=2, progress=False)
    strided = stagejax.perplexity(model, text, n_ctx=64, procedure="strided", stride=32,
                                  progress=False)
    assert llama.n_chunks == 2 and llama.n_scored_tokens == 2 * 31
    assert strided.n_scored_tokens == len(model.tokenizer.encode(text)) - 1
    assert 1 < llama.ppl < 1e4 and 1 < strided.ppl < 1e4


def test_api_runs_any_plan_to_the_same_tokens_and_perplexity(tmp_path):
    """Streamed plans (and a quantized resident one) through the public API: staged output is
    the resident model's, and a budget plan's too."""
    model = stagejax.load_model("tiny")
    reference = stagejax.generate(model, "Hello", max_new_tokens=6)
    for schedule in ("atomic", "layer"):
        staged = stagejax.generate(model, "Hello", max_new_tokens=6, schedule=schedule,
                                   cache_dir=str(tmp_path))
        assert staged.new_ids == reference.new_ids, schedule
    text = "A line of text for the tiny model to score. " * 20
    resident = stagejax.perplexity(model, text, n_ctx=64, n_chunks=2, progress=False)
    streamed = stagejax.perplexity(model, text, n_ctx=64, n_chunks=2, progress=False,
                                   schedule="budget", budget_mb=4, cache_dir=str(tmp_path))
    assert streamed.n_scored_tokens == resident.n_scored_tokens
    assert abs(streamed.mean_nll - resident.mean_nll) < 1e-4


def test_the_library_imports_no_harness():
    """`import stagejax` and its Python API load neither the experiment harness (hydra) nor the
    tracker (wandb), nor plotting: a library user pays for what they call."""
    import subprocess
    import sys

    probe = ("import sys, stagejax; stagejax.load_model; import stagejax.api; "
             "print(sorted(m for m in ('hydra', 'omegaconf', 'wandb', 'matplotlib') "
             "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
