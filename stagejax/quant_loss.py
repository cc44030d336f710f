"""What a weight format costs in loss: measured perplexity ratios as additive loss offsets.

Owns the quantization term of the co-design searches. Scaling laws are fitted
on models evaluated in their training precision, so they predict the same loss for a model
stored in 4 bits as in 16: without a penalty, fewer bits only ever win. The project measured
each format's perplexity on SmolLM2-135M (`experiments/bench_quant.py`, results in
`experiments/results/quant_smollm2/summary.json`: `ppl_vs_none[format]` = PPL_format /
PPL_none − 1 over the first 20 WikiText-2 chunks). A format's ratio multiplies the predicted
perplexity, PPL_q = ratio · exp(L), i.e. it adds ln(ratio) nats to the predicted loss:

    L_q = L + ln(PPL_format / PPL_reference)

(Multiplying the loss itself by the ratio would mix units: SmolLM2's int4_g32 ratio 1.574 is
+0.454 nats on a loss of 3.33, i.e. +13.6% of the loss, not +57%.) A format without a
measurement has no offset and is excluded from a search (`loss_offset` raises).

Caveats, stated with the numbers wherever they are used: the reference `none` is float32 of
the weights dequantized from SmolLM2's GGUF (itself a Q4_1/Q8_0 mix), so the int4 ratios are
for re-quantizing already-quantized weights on one 135M model; float16 was not measured and is
taken as the laws' own reference precision (ratio 1 by assumption).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Mapping

from stagejax.roofline import quantized_bits

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_QUANT_SUMMARY = REPO_ROOT / "experiments" / "results" / "quant_smollm2" / "summary.json"

# Bits per weight of each project format (`stagejax.quant`, design §6), scales included.
FORMAT_BITS = {
    "float32": 32.0,
    "float16": 16.0,
    "int8": 8.0,  # per-row float scales: + 16 or 32 bits per row of thousands of weights, ~8
    "int4_g32": quantized_bits(4, 32),  # 4.5
    "int4_g64": quantized_bits(4, 64),  # 4.25
    "int4_g32_asym": quantized_bits(4, 32, zero_point=True),  # 5.0
}
# The benchmark's name for float32 (no quantization) is "none".
_BENCH_NAMES = {"none": "float32"}


@dataclasses.dataclass(frozen=True)
class QuantLossTable:
    """Perplexity ratio (format / reference) per weight format, and where they come from.

    `assumed` lists formats whose ratio is not measured but set by assumption (float16).
    """

    ratios: Mapping[str, float]
    source: str
    assumed: tuple[str, ...] = ()

    def loss_offset(self, weight_format: str) -> float:
        """ln(ratio): the nats a format adds to a predicted loss. Raises for an unmeasured
        format, which a search must exclude."""
        try:
            return math.log(self.ratios[weight_format])
        except KeyError:
            raise KeyError(f"no measured perplexity ratio for weight format {weight_format!r} "
                           f"(measured: {sorted(self.ratios)}); exclude it from the search") from None

    def format_for_bits(self, bits: float) -> str | None:
        """The measured format stored at `bits` bits per weight, or None."""
        matches = [f for f, b in FORMAT_BITS.items() if math.isclose(b, bits) and f in self.ratios]
        return matches[0] if matches else None

    def loss_offset_for_bits(self, bits: float) -> float:
        weight_format = self.format_for_bits(bits)
        if weight_format is None:
            raise KeyError(f"no measured weight format stores {bits:g} bits per weight "
                           f"(measured: {sorted(self.ratios)}); exclude it from the search")
        return self.loss_offset(weight_format)

    def rows(self) -> list[dict]:
        """One row per format for tables: bits, ratio, loss offset, measured or assumed."""
        return [{"format": f, "bits": FORMAT_BITS.get(f), "ppl_ratio": round(r, 4),
                 "loss_offset_nats": round(math.log(r), 4),
                 "origin": "assumed" if f in self.assumed else "measured"}
                for f, r in sorted(self.ratios.items(), key=lambda kv: -FORMAT_BITS.get(kv[0], 0))]


def load_quant_loss(path: str | Path = SMOLLM2_QUANT_SUMMARY, *,
                    float16_as_reference: bool = True) -> QuantLossTable:
    """The perplexity ratios of a quantization benchmark's `summary.json` (`ppl_vs_none`).

    `float16_as_reference`: add float16 with ratio 1 (assumed, not measured; the scaling laws
    are fitted at training precision, which this stands for).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        relative = data["ppl_vs_none"]
    except FileNotFoundError:
        raise FileNotFoundError(f"no quantization summary at {path}; run experiments/bench_quant.py") from None
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} has no ppl_vs_none table: {error!r}") from None
    ratios = {}
    for name, increase in relative.items():
        if name == "gguf_native":  # the source file's own blocks, not a format the search picks
            continue
        ratios[_BENCH_NAMES.get(name, name)] = 1.0 + float(increase)
    assumed = ()
    if float16_as_reference and "float16" not in ratios:
        ratios["float16"] = 1.0
        assumed = ("float16",)
    try:
        source = str(path.relative_to(REPO_ROOT))
    except ValueError:
        source = path.name
    return QuantLossTable(ratios, source, assumed)
