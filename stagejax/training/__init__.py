"""Training small Llama-family models from scratch: the scaling-law experiment.

Modules: `settings` (typed run settings, the schemas of `conf_train/`), `tokenizer_train` (the
corpus's byte-level BPE tokenizer and cached token ids), `data` (batches and the resumable data
position), `architecture` (sweep point -> `ModelConfig`, parameter and FLOP counts), `checkpoint`
(orbax), `train` (`run_training`, the Python API), `sweep` (a sweep's runs and their fitted loss
laws) and `run` (the hydra entry, `python -m stagejax.training.run`). See docs/training.md.
"""

__all__ = ["TrainSettings", "run_training"]


def __getattr__(name):
    # Lazy: `python -m stagejax.training.run` imports this package first, and the entry must set
    # JAX_PLATFORMS / OPENBLAS_NUM_THREADS before jax is imported.
    if name == "TrainSettings":
        from stagejax.training.settings import TrainSettings
        return TrainSettings
    if name == "run_training":
        from stagejax.training.train import run_training
        return run_training
    raise AttributeError(f"module 'stagejax.training' has no attribute {name!r}")
