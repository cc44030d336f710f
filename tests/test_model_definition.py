"""The model is defined once: its math (contractions, softmax, normalisation, activations)
lives in the model package, `stagejax.models`, and everything else reaches it through the
Flax modules' methods or the package's `ops` (tests/test_staged.py checks that changing a
method moves staged and monolithic logits alike)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "stagejax", REPO / "runtime" / "stagejax_device"]
MODEL_PACKAGE = REPO / "stagejax" / "models"
# Math outside the model that is not the model's, each with why.
ALLOWED = {
    "stagejax/quant.py": "quantization codecs: dequantization inside the jit",
    "stagejax/sampling.py": "sampling: a softmax over the logits to draw a token",
    "stagejax/calibration.py": "microbenchmarks of this machine's matmul rate",
}
MODEL_MATH = {"einsum", "dot", "matmul", "tensordot", "dot_general", "softmax", "log_softmax",
              "logsumexp", "rsqrt", "gelu", "silu", "swish", "sigmoid", "tanh", "erf"}


def model_math(source: str) -> list[tuple[int, str]]:
    """(line, what) of every call of a model-math function (other than the model package's
    `ops.<name>`) and every `@` in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            found.append((node.lineno, "@"))
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                via_ops = isinstance(func.value, ast.Name) and func.value.id == "ops"
                if func.attr in MODEL_MATH and not via_ops:
                    found.append((node.lineno, func.attr))
            elif isinstance(func, ast.Name) and func.id in MODEL_MATH:
                found.append((node.lineno, func.id))
    return sorted(found)


def test_model_math_lives_only_in_the_model_package():
    offenders = []
    for root in SOURCES:
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            if path.is_relative_to(MODEL_PACKAGE) or relative in ALLOWED:
                continue
            offenders += [f"{relative}:{line} {what}" for line, what in model_math(path.read_text())]
    assert not offenders, ("model math outside stagejax/models (apply a module's method, or "
                           "add a function to stagejax/models/ops.py): " + ", ".join(offenders))


def test_the_check_finds_model_math():
    source = ("import jax, jax.numpy as jnp\nfrom stagejax.models import ops\n"
              "def head(h, w):\n    return jnp.einsum('td,dv->tv', h, w) + h @ w\n"
              "def norm(x):\n    return x * jax.lax.rsqrt(ops.rms(x))\n"
              "def fine(x):\n    return ops.log_softmax(x)\n")
    assert model_math(source) == [(4, "@"), (4, "einsum"), (6, "rsqrt")]
