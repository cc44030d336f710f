"""Every YAML under conf/ composes into valid typed settings; bad values fail clearly."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from stagejax.model_config import PRESETS
from stagejax.run import to_settings
from stagejax.settings import RunSettings

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUP_OPTIONS = sorted((p.parent.name, p.stem) for p in CONF.glob("*/*.yaml"))


def compose_settings(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_settings(compose(config_name="config", overrides=list(overrides)))


def test_default_config_composes():
    settings = compose_settings()
    assert isinstance(settings, RunSettings)
    assert settings.model.name == "smollm2_135m"


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_group_option_composes(group, option):
    # experiment/ presets are not in the defaults list: they are added with `+`.
    prefix = "+" if group == "experiment" else ""
    settings = compose_settings([f"{prefix}{group}={option}"])
    assert isinstance(settings, RunSettings)


def test_every_model_preset_has_a_yaml_and_back():
    assert {o for g, o in GROUP_OPTIONS if g == "model"} == set(PRESETS)


@pytest.mark.parametrize("override,message", [
    ("decode.max_new_tokens=0", "decode.max_new_tokens must be a positive number"),
    ("eval.procedure=bogus", "eval.procedure='bogus' is not one of"),
    ("decode.top_p=1.5", r"decode.top_p must be in \(0, 1\]"),
    ("tracking.mode=sometimes", "tracking.mode='sometimes' is not one of"),
    ("model.name=nope", "model.name='nope' is not one of"),
    ("decode.prompt=''", "decode.prompt is empty: give it some text"),
    ("eval.text_mode=crlf", "eval.text_mode='crlf' is not one of: bytes, text"),
])
def test_bad_values_get_a_clear_error(override, message):
    with pytest.raises(ValueError, match=message):
        compose_settings([override])


def test_wrong_type_and_unknown_option_are_refused():
    with pytest.raises(ConfigCompositionException, match="decode.max_new_tokens=lots"):
        compose_settings(["decode.max_new_tokens=lots"])
    with pytest.raises(ConfigCompositionException, match="schedule"):
        compose_settings(["schedule=no_such_policy"])


def test_perplexity_context_defaults_to_the_models_when_shorter():
    """`eval.n_ctx` unset is 512 or the model's context, whichever is shorter, so the tiny
    models run with the defaults; a value set explicitly is never shortened silently."""
    settings = compose_settings(["model=tiny"])
    assert settings.eval.n_ctx is None
    assert settings.eval.context(PRESETS["tiny"].config.max_seq_len) == 97
    assert settings.eval.context(8192) == 512
    explicit = compose_settings(["model=tiny", "eval.n_ctx=512"])
    with pytest.raises(ValueError, match="eval.n_ctx=512 exceeds the model's context of 97 "
                                         "tokens; set eval.n_ctx to at most 97, or leave it unset"):
        explicit.eval.context(97)
