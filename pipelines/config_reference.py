"""The configuration reference (docs/config.md), generated from the pydantic model itself so it
cannot drift from what `load_config` accepts: every field by its dotted path, with its type,
default, bounds and description. `wsss config --reference` prints it."""

from __future__ import annotations

import json
import types
import typing

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipelines.config import RunConfig

_BOUNDS = {  # constraint type: (how it reads, its attribute)
    Ge: (">=", "ge"),
    Gt: (">", "gt"),
    Le: ("<=", "le"),
    Lt: ("<", "lt"),
    MinLen: ("min length", "min_length"),
    MaxLen: ("max length", "max_length"),
}


def _type_name(annotation: object) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: FieldInfo) -> str:
    parts = []
    for meta in field.metadata:
        for kind, (symbol, attribute) in _BOUNDS.items():
            if isinstance(meta, kind):
                parts.append(f"{symbol} {getattr(meta, attribute)}")
    return ", ".join(parts)


def _section(annotation: object) -> type[BaseModel] | None:
    return (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )


def _members(annotation: object) -> list[type[BaseModel]]:
    """The members of a family's union (e.g. the poolings), told apart by their `name`."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return []
    members = [_section(a) for a in typing.get_args(annotation)]
    if not all(m is not None and "name" in m.model_fields for m in members):
        return []
    return members


def _description(field: FieldInfo, member: str = "") -> str:
    text = (field.description or "").replace("|", "\\|").replace("\n", " ")
    return f"({member}) {text}" if member else text


def _rows(model: type[BaseModel], defaults: BaseModel, prefix: str) -> list[tuple[str, ...]]:
    rows = []
    written = defaults.model_dump(mode="json")
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        value = getattr(defaults, name)
        section = _section(field.annotation)
        if section is not None:
            rows += _rows(section, value, f"{path}.")
            continue
        # A family's default member may be written by omission (the plain CAM): its name.
        default = json.dumps(written[name] if name in written else value.name)
        members = _members(field.annotation)
        if members:
            # One row naming the members, then each member's own settings, marked with its name.
            names = [m.model_fields["name"].default for m in members]
            kinds = " \\| ".join(json.dumps(n) for n in names)
            rows.append((path, kinds, default, "", _description(field)))
            for member, member_name in zip(members, names, strict=True):
                for key, setting in member.model_fields.items():
                    if key != "name":
                        default = json.dumps(member().model_dump(mode="json")[key])
                        row = (_type_name(setting.annotation), default, _bounds(setting))
                        rows.append((f"{path}.{key}", *row, _description(setting, member_name)))
            continue
        rows.append(
            (path, _type_name(field.annotation), default, _bounds(field), _description(field))
        )
    return rows


def markdown() -> str:
    """The reference page: one table of every field of `RunConfig`, defaults as in a run with no
    config file (the embedded demo)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `pipelines.config.RunConfig` by `wsss config --reference` (a test checks",
        "this page is current). Set fields in a YAML file (`--config FILE`, nested by section) or",
        "on the command line (`--set section.field=value`, values parsed as YAML). Defaults are",
        "those of a run without a config file: the embedded demo. `wsss config` prints a resolved",
        "configuration, `wsss config --schema` its JSON schema.",
        "",
        "| field | type | default | bounds | description |",
        "|---|---|---|---|---|",
    ]
    for path, type_name, default, bounds, description in _rows(RunConfig, RunConfig(), ""):
        lines.append(f"| `{path}` | {type_name} | `{default}` | {bounds} | {description} |")
    return "\n".join(lines) + "\n"
