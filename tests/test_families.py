"""What every family's configuration does (`wsss.params.registered_union`), for each family of
the classifier: a member by bare name or by its settings, written back as it was given, a wrong
name or setting failing naming the field."""

from __future__ import annotations

import pydantic
import pytest

from wsss.cam_methods import CAM_METHODS
from wsss.classifier import ClassifierParams
from wsss.poolings import POOLINGS

# field, registry, a member without settings, a member with settings (given, written), a bad
# setting of that member.
FAMILIES = [
    (
        "pooling",
        POOLINGS,
        "gmp",
        ({"name": "top_k", "kmax": 3}, {"name": "top_k", "kmax": 3.0, "kmin": 0.2, "alpha": 0.7}),
        {"name": "top_k", "kmin": -1},
    ),
    (
        "method",
        CAM_METHODS,
        "cam",
        ({"name": "wildcat", "maps_per_class": 3}, {"name": "wildcat", "maps_per_class": 3}),
        {"name": "wildcat", "maps_per_class": 0},
    ),
]


@pytest.mark.parametrize(("field", "registry", "bare", "member", "bad"), FAMILIES)
def test_a_family_member_is_chosen_by_name_and_written_back_as_given(
    field, registry, bare, member, bad
):
    assert ClassifierParams(**{field: bare}).model_dump(mode="json").get(field, bare) == bare
    given, written = member
    params = ClassifierParams(**{field: given})
    assert params.model_dump(mode="json")[field] == written
    assert ClassifierParams.model_validate(params.model_dump(mode="json")) == params
    names = ", ".join(repr(n) for n in registry)
    with pytest.raises(pydantic.ValidationError, match=rf"{field}\n.*'nope'.*{names}"):
        ClassifierParams(**{field: "nope"})
    setting = next(k for k in bad if k != "name")
    with pytest.raises(pydantic.ValidationError, match=rf"{field}\.{bad['name']}\.{setting}"):
        ClassifierParams(**{field: bad})
