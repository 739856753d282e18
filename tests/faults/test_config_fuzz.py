"""Config fuzzing: every numeric key of the schema set to a negative, a zero, a wrong type or an
absurd value, and to a value just beyond each bound declared for it. Each case has one expected
outcome, from the bounds declared on its field (conf/schema.py: `bounded`) and the key's type: accepted, or refused
by composition (a wrong type) or by validation with one error line led by the key, before any Ray
or training work; never another exception."""
from __future__ import annotations

import dataclasses
import math
import re

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from conf.schema import Bounds, Config
from pipelines.validate import validate
from tasks.common import UserError
from tests.conftest import compose_config


def numeric_keys(cls=Config, prefix: str = "") -> dict[str, tuple[str, Bounds | None]]:
    """Every numeric key of the schema: its declared type and bounds."""
    keys = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys.update(numeric_keys(type(default), f"{prefix}{f.name}."))
        elif f.type in ("int", "float", "Optional[int]"):
            keys[f"{prefix}{f.name}"] = f.type, f.metadata.get("bounds")
    return keys


KEYS = numeric_keys()
# Values within the declared bounds that a check across fields refuses: (key, value) -> what leads its message.
CROSS_FIELD = {
    **{("tokenizer.val_fraction", value): "tokenizer.val_fraction" for value in ("0", "1e30")},  # within (0, 1)
    **{(key, "1e30"): key for key in ("pretrain.min_lr_ratio", "finetune.min_lr_ratio")},  # within 0..1
    **{(key, value): "task.test_fraction / task.val_fraction"  # both within (0, 1)
       for key in ("task.test_fraction", "task.val_fraction") for value in ("0", "1e30")},
}


def values_to_try(key: str) -> list[str]:
    """Negative, zero, absurd, and just beyond each bound declared for the field (-1 and 0 are below
    every lower bound but 2)."""
    bounds = KEYS[key][1]
    values = ["-1", "0", "1e30"]
    if bounds.low >= 2:
        values.append(str(bounds.low - 1))
    if bounds.below is not None:
        values.append(f"{bounds.below:g}")
    if bounds.at_most is not None:
        values.append(str(bounds.at_most + 1) if bounds.why else "1.5")  # a sanity limit, or a share's 1
    return values


def within_bounds(key: str, value: float) -> bool:
    bounds = KEYS[key][1]
    return (bounds.low <= value <= (math.inf if bounds.at_most is None else bounds.at_most)
            and (bounds.below is None or value < bounds.below))


def expected(key: str, value: str) -> str:
    """A wrong type (a word, or 1e30 for an integer) stops composition; a value outside the declared
    bounds is refused naming the key; one within them is accepted unless a check across fields says no."""
    if value == "twelve" or (value == "1e30" and KEYS[key][0] != "float"):
        return "refused at composition"
    if not within_bounds(key, float(value)):
        return f"refused: {key}"
    return "refused: " + CROSS_FIELD[key, value] if (key, value) in CROSS_FIELD else "accepted"


def outcome(key: str, value: str) -> str:
    try:
        cfg = compose_config(["+experiment=tiny", f"{key}={value}"])
    except (ConfigCompositionException, ValidationError) as error:
        assert key.rsplit(".", 1)[-1] in str(error), str(error)
        return "refused at composition"
    try:
        validate(cfg)
    except UserError as error:
        message = str(error)  # one line naming the field; a cross-field check may lead with a sibling key
        assert "\n" not in message and message.split(":")[0].split(".")[0] == key.split(".")[0], message
        assert re.search(rf"\b{key.rsplit('.', 1)[-1]}\b", message), message
        return "refused: " + message.split(":")[0]
    return "accepted"


def test_every_numeric_key_is_fuzzed_and_bounded():
    assert len(KEYS) > 60 and "model.num_heads" in KEYS and "finetune.lora.r" in KEYS
    assert [key for key, (_, bounds) in KEYS.items() if bounds is None] == []  # check_bounds skips those
    assert [key for key, _ in CROSS_FIELD if key not in KEYS] == []


@pytest.mark.parametrize("key", KEYS)
def test_negative_wrong_typed_absurd_and_out_of_bounds_values_get_their_expected_outcome(key):
    for value in ["twelve", *values_to_try(key)]:
        assert outcome(key, value) == expected(key, value), f"{key}={value}"
