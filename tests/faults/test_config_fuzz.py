"""Config fuzzing: every numeric key of the schema set to a negative, a zero, a wrong type or an
absurd value. The outcome is a valid config or one error naming the key, from composition or
validation, before any Ray or training work; never another exception."""
from __future__ import annotations

import dataclasses

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from conf.schema import Config
from pipelines.validate import LOWER_BOUNDS, validate
from tasks.common import UserError
from tests.conftest import compose_config


def numeric_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += numeric_keys(type(default), f"{prefix}{f.name}.")
        elif f.type in ("int", "float", "Optional[int]"):
            keys.append(f"{prefix}{f.name}")
    return keys


KEYS = numeric_keys()


def outcome(key: str, value: str) -> str:
    try:
        cfg = compose_config(["+experiment=tiny", f"{key}={value}"])
    except (ConfigCompositionException, ValidationError) as error:
        assert key.rsplit(".", 1)[-1] in str(error), str(error)
        return "refused at composition"
    try:
        validate(cfg)
    except UserError as error:
        message = str(error)
        assert "\n" not in message and message.split(":")[0].split(".")[0] == key.split(".")[0], message
        return "refused: " + message.split(":")[0]
    return "accepted"


def test_every_numeric_key_is_fuzzed():
    assert len(KEYS) > 60 and "model.num_heads" in KEYS and "finetune.lora.r" in KEYS


@pytest.mark.parametrize("key", KEYS)
def test_negative_wrong_typed_and_absurd_values_name_the_key(key):
    name = key.rsplit(".", 1)[-1]
    assert outcome(key, "-1").startswith("refused"), f"{key}=-1 was accepted"
    assert outcome(key, "twelve").startswith("refused"), f"{key}=twelve was accepted"
    zero = outcome(key, "0")
    assert zero == "accepted" or zero.startswith("refused")
    if LOWER_BOUNDS.get(name, 0) >= 1:
        assert zero.startswith("refused"), f"{key}=0 was accepted"
    outcome(key, "1e30")  # absurdly large: accepted or refused with the key, nothing else
