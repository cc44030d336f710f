"""Train one model or a sweep of the scaling-law experiment (hydra; `conf_train/`).

    python experiments/scaling/train.py model=q03 train.tokens=200000      # one run
    python experiments/scaling/train.py -m experiment=quick                # the quick sweep
    python experiments/scaling/train.py -m experiment=full                 # the full sweep
    python experiments/scaling/fit_and_pareto.py multirun/scaling/<date>/<time>

The same entry as `python -m stagejax.training.run` (stagejax/training/run.py); see
docs/training.md.
"""

from stagejax.training.run import main

if __name__ == "__main__":
    main()
