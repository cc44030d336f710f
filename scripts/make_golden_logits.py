"""Regenerate tests/data/smollm2_golden_logits.npz from transformers (needs the parity extras).

Stores, for the first 64 tokens of wiki.test.raw under SmolLM2-135M-Instruct (float32,
transformers' own GGUF loader): the token ids, each position's top-16 token ids and logits, and
every position's logits at 256 fixed vocabulary ids. ~70 KB, so the golden check runs without
torch. Usage: .venv/bin/python scripts/make_golden_logits.py
"""

import os
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from stagejax import data
from stagejax.importers.gguf import GGUFFile, packaged_smollm2_gguf

N_TOKENS = 64
TOP_K = 16
N_FIXED_IDS = 256
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "smollm2_golden_logits.npz"


def main():
    gguf_path = packaged_smollm2_gguf()
    with GGUFFile(gguf_path) as gguf_file:
        tokenizer = gguf_file.tokenizer()
    ids = tokenizer.encode(data.read_text("wikitext-2/wiki.test.raw"))[:N_TOKENS]
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    top_ids = np.argsort(-logits, axis=-1)[:, :TOP_K]
    fixed_ids = np.random.default_rng(0).choice(logits.shape[-1], N_FIXED_IDS, replace=False)
    np.savez_compressed(OUT, token_ids=np.asarray(ids, np.int32), top_ids=top_ids.astype(np.int32),
                        top_logits=np.take_along_axis(logits, top_ids, -1),
                        fixed_ids=fixed_ids.astype(np.int32), fixed_logits=logits[:, fixed_ids])
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
