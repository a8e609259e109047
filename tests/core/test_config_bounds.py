"""Every numeric or boolean stage option is strict, finite and bounded (issue 15, finding 6).

The check is generic over the registry, so a field added later as a bare ``int``/``float``/``bool``
(which pydantic would coerce from ``true``, ``"3"`` or ``1e300``) fails here until it uses a field kind.
"""

from __future__ import annotations

import math
import types
import typing

import pytest

from deepsqueeze.core.config import config_from_dict, config_to_dict, registered_stages
from deepsqueeze.errors import RecipeError


def scalar_type(annotation: object) -> type | None:
    """``int``, ``float`` or ``bool`` for a field of that type (optional or not), else None."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    candidates = [a for a in args if a is not type(None)] if args else [annotation]
    if len(candidates) == 1 and candidates[0] in (int, float, bool):
        return candidates[0]  # type: ignore[return-value]
    return None


def scalar_fields() -> list[tuple[str, str, type]]:
    out = []
    for stage_type, cls in registered_stages().items():
        for name, field in cls.model_fields.items():
            kind = scalar_type(field.annotation)
            if kind is not None:
                out.append((stage_type, name, kind))
    return out


FIELDS = scalar_fields()


def build(stage_type: str, name: str, value: object):
    cls = registered_stages()[stage_type]
    recipe_form = config_to_dict(cls.example())
    recipe_form[name] = value
    return config_from_dict(recipe_form)


def test_the_registry_has_numeric_and_boolean_options():
    kinds = {kind for _, _, kind in FIELDS}
    assert kinds == {int, float, bool} and len(FIELDS) > 50


@pytest.mark.parametrize("stage_type, name, kind", FIELDS, ids=[f"{s}.{n}" for s, n, _ in FIELDS])
def test_numbers_are_strict_finite_and_bounded(stage_type, name, kind):
    bad: list[object] = ["3", "true"]
    if kind is bool:
        bad += [1, 0, 1.0]
    else:
        bad += [True, False, 1e300, -1e300, math.inf, math.nan]
        if kind is int:
            bad += [2.0, 2**80]
    for value in bad:
        with pytest.raises(RecipeError, match=name):
            build(stage_type, name, value)


@pytest.mark.parametrize("value, accepted", [
    (1, True), (0.5, True), (10_000, True), (1e300, False), (-1, False), (True, False), (math.nan, False),
])
def test_epochs(value, accepted):
    stage = {"type": "finetune", "epochs": value}
    if accepted:
        assert config_from_dict(stage).epochs == value
    else:
        with pytest.raises(RecipeError, match="epochs"):
            config_from_dict(stage)


def test_ratios_bits_and_nested_values_are_bounded():
    for stage in (
        {"type": "prune", "sparsity": 1.5},
        {"type": "prune", "overrides": {"fc1": 1.5}},
        {"type": "prune", "overrides": {"fc1": True}},
        {"type": "prune_channels", "overrides": {"fc1": 1.0}},
        {"type": "quantize", "alpha": -0.1},
        {"type": "quantize", "bits": True},
        {"type": "share", "overrides": {"fc1": 17}},
        {"type": "distill", "keep": [0, True]},
        {"type": "distill", "keep": [-1]},
    ):
        with pytest.raises(RecipeError):
            config_from_dict(stage)
    assert config_from_dict({"type": "prune", "overrides": {"fc1": 1}}).overrides == {"fc1": 1.0}


def test_stage_type_and_option_names_must_be_strings():
    with pytest.raises(RecipeError, match="'type' must be a stage name"):
        config_from_dict({"type": [["finetune"] * 3] * 3})
    with pytest.raises(RecipeError, match="option names are strings"):
        config_from_dict({"type": "finetune", 1: 2})
    with pytest.raises(RecipeError, match=r"unknown stage type 'xxxxx.*\.\.\.'"):
        config_from_dict({"type": "x" * 100_000})


def test_numpy_scalars_are_numbers_but_numpy_bools_are_not():
    np = pytest.importorskip("numpy")
    config = config_from_dict({"type": "prune", "rounds": np.int64(4), "sparsity": np.float32(0.5),
                               "overrides": {"fc1": np.float64(0.25)}})
    assert (config.rounds, config.sparsity, config.overrides) == (4, 0.5, {"fc1": 0.25})
    assert type(config.rounds) is int
    with pytest.raises(RecipeError, match="rounds"):
        config_from_dict({"type": "prune", "rounds": np.bool_(True)})
