#!/usr/bin/env python
"""Our SmolLM2 against an independent implementation on the same weights: transformers' Llama
loaded from the same Q4_1 GGUF (float32), logits over the first tokens of wiki.test.raw.

    python experiments/parity_transformers.py [--tokens 64]

Writes experiments/results/parity_transformers/summary.json: the largest absolute logit
difference, the logits' magnitude, and whether the argmax agrees at every position (the test
tier asserts max |diff| <= 5e-4, tests/test_smollm2.py). Needs the `parity` extra.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from stagejax import data  # noqa: E402
from stagejax.decode import forward_logits  # noqa: E402
from stagejax.loading import load_model  # noqa: E402
from stagejax_device.results import atomic_write_json  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--results", type=Path, default=REPO / "experiments" / "results" / "parity_transformers")
    args = parser.parse_args()
    import torch
    import transformers

    model = load_model("smollm2_135m")
    ids = model.tokenizer.encode(data.read_text("wikitext-2/wiki.test.raw")[:4000])[:args.tokens]
    ours = np.asarray(jax.jit(forward_logits, static_argnums=0)(model.config, model.params, jnp.asarray([ids])))[0]
    path = Path(model.source_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0].numpy()
    diff = np.abs(ours - theirs)
    summary = {
        "command": "python experiments/parity_transformers.py" + (f" --tokens {args.tokens}" if args.tokens != 64 else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "tokens": len(ids), "text": "wiki.test.raw read as bytes (CRLF kept), first tokens",
        "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
        "max_abs_logit": float(np.abs(theirs).max()),
        "argmax_equal_positions": int((ours.argmax(-1) == theirs.argmax(-1)).sum()),
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }
    atomic_write_json(args.results / "summary.json", summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
