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


# Modules that may name a family: the family declarations themselves, and the importers, whose
# per-family tensor names are the file formats' (GGUF's `general.architecture`, HF's `model_type`).
FAMILY_OWNERS = ("stagejax/models/family.py", "stagejax/models/llama.py", "stagejax/models/gpt2.py",
                 "stagejax/models/qwen3.py", "stagejax/importers/")


def family_branches(source: str) -> list[int]:
    """Lines comparing anything with a family's name, or branching on `.family`."""
    from stagejax.models.family import family_names

    names = set(family_names())
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            named = any(isinstance(o, ast.Constant) and o.value in names for o in operands)
            on_family = any(isinstance(o, ast.Attribute) and o.attr == "family" for o in operands)
            if named or on_family:
                lines.append(node.lineno)
    return lines


def test_no_module_outside_the_families_branches_on_a_family():
    offenders = []
    for root in SOURCES:
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            if relative.startswith(FAMILY_OWNERS):
                continue
            offenders += [f"{relative}:{line}" for line in family_branches(path.read_text())]
    assert not offenders, ("a family's name compared outside its family module (read "
                           "config.traits instead): " + ", ".join(offenders))


def test_the_family_check_finds_branches():
    source = 'def f(config):\n    if config.family == "gpt2":\n        pass\n    x = "llama" in y\n'
    assert family_branches(source) == [2, 4]


def test_a_parameter_of_the_wrong_shape_names_it():
    """Stored parameters skip Flax's initializer trace but keep its shape check."""
    import jax.numpy as jnp
    import pytest

    from stagejax.models.layers import Einsum

    layer = Einsum((4, 3), "BTD,DF->BTF", bias_shape=(3,))
    x = jnp.ones((1, 2, 4))
    good = {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros((3,))}
    assert layer.apply({"params": good}, x).shape == (1, 2, 3)
    with pytest.raises(ValueError, match=r"bias: parameter of shape \(4,\) .* needs \(3,\)"):
        layer.apply({"params": {**good, "bias": jnp.zeros((4,))}}, x)
