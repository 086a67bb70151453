"""Config models of plugin descriptors, and pydantic's errors in the words of the core's own settings.

A descriptor (`CacheBackendType`, `StorageBackendType`, `RegistryFormatType`) declares the keys it
owns as a pydantic model, usually a `ConfigModel`. `batlehub.app.validate_config` validates with
it and turns each error into one line that names the key path the way `batlehub.config` does
(`storage.bucket: required`, `registries[0].upstreams[1]: expected an http:// or https:// URL,
got 'ftp://x'`), so `batlehub check-config` reads the same whoever owns the key.
"""

from __future__ import annotations

import re
import types
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, ValidationInfo
from pydantic.fields import FieldInfo

if TYPE_CHECKING:
    from batlehub.config import Settings

T = TypeVar("T")


class ConfigModel(BaseModel):
    """The base of a descriptor's `config_model`.

    As strict as the core's own settings: TOML already has types, so `"300"` is no number and `1`
    no boolean, and a typo'd key is an error rather than a silently ignored setting. Validated
    configs are immutable, like `Settings`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _tuple_from_list(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


ConfigList = Annotated[tuple[T, ...], BeforeValidator(_tuple_from_list)]
"""A TOML array, kept as a tuple so the validated model stays immutable (strict models would
otherwise refuse the list that TOML gives)."""


def core_settings(info: ValidationInfo) -> Settings | None:
    """The core's `Settings`, for a validator whose check depends on them (the postgres cache's
    `url` defaults to `database.url`). None when the core settings are invalid themselves
    (`check-config` still validates the plugins' keys then): skip such a check, since the core's
    own problems are reported anyway."""
    context = info.context if isinstance(info.context, dict) else {}
    settings: Settings | None = context.get("settings")
    return settings


def forbids_unknown_keys(model: type[BaseModel]) -> bool:
    return model.model_config.get("extra") == "forbid"


# --- errors ---------------------------------------------------------------------------------------

# batlehub.config's phrases, so a message does not tell which side owns the key.
_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "dict_type": "a table",
    "path_type": "a path",
}
_LIST_TYPES = frozenset({"tuple_type", "list_type", "set_type", "frozen_set_type", "iterable_type"})
_ITEMS = {str: "strings", int: "integers", float: "numbers", bool: "true or false values"}
_BOUNDS = {
    "greater_than_equal": ("ge", "must be at least"),
    "greater_than": ("gt", "must be greater than"),
    "less_than_equal": ("le", "must be at most"),
    "less_than": ("lt", "must be less than"),
}


def problems_of(
    error: ValidationError,
    model: type[BaseModel],
    *,
    path: str,
    owner: str,
    table_keys: Collection[str] = (),
) -> list[str]:
    """Each error of validating `model` as one `"key.path: message"` line.

    `path`: where the model's keys live (`cache`, `registries[0]`). `owner`: who declares them,
    for unknown keys (`type 's3'`). `table_keys`: keys of the same table that the core owns
    (`type`, or a registry's `name`, `rbac`...), listed among the known ones.
    """
    lines = []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        lines.append(f"{path}{_render(loc)}: {_message(item, loc, model, owner, table_keys)}")
    return lines


def _render(loc: tuple[str | int, ...]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


def _message(
    item: Any, loc: tuple[str | int, ...], model: type[BaseModel], owner: str, table_keys: Collection[str]
) -> str:
    kind, ctx, value = item["type"], item.get("ctx") or {}, item.get("input")
    if kind == "missing":
        field = _field_at(model, loc)
        examples = field.examples if field is not None else None
        return f"required (e.g. {examples[0]!r})" if examples else "required"
    if kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        known = sorted({*_keys_of(parent), *(table_keys if len(loc) == 1 else ())}) if parent else []
        whose = f" for {owner}" if len(loc) == 1 else ""
        return f"unknown key{whose} (known: {', '.join(known) or 'none'})"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])  # the validator's own words, which name the value where it helps
    if kind == "literal_error":
        choices = re.findall(r"'((?:[^'\\]|\\.)*)'", str(ctx.get("expected", "")))
        expected = f"one of {', '.join(choices)}" if choices else str(ctx.get("expected"))
        return f"expected {expected}, got {value!r}"
    if kind in _LIST_TYPES:
        return f"expected {_list_of(_field_at(model, loc))}, got {value!r}"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {value!r}"
    if kind in _BOUNDS:
        bound, phrase = _BOUNDS[kind]
        return f"{phrase} {_number(ctx.get(bound))}, got {_number(value)}"
    if kind == "string_too_short":
        if ctx.get("min_length") == 1:
            return "must not be empty"
        return f"must be at least {ctx.get('min_length')} characters, got {value!r}"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters, got {value!r}"
    if kind == "string_pattern_mismatch":
        return f"expected a string matching {ctx.get('pattern')}, got {value!r}"
    message = str(item["msg"])
    if message.startswith("Input should be "):  # pydantic's own types: say it as the core does
        return f"expected {message.removeprefix('Input should be ')}, got {value!r}"
    return message  # a validator's custom error (PydanticCustomError) is shown as its author wrote it


def _list_of(field: FieldInfo | None) -> str:
    """`a list of strings` where the field says what its items are, else `a list`."""
    args = get_args(field.annotation) if field is not None else ()
    item = args[0] if args else None
    while get_origin(item) is Annotated:
        item = get_args(item)[0]
    if isinstance(item, type) and issubclass(item, BaseModel):
        return "a list of tables"
    return f"a list of {_ITEMS[item]}" if item in _ITEMS else "a list"


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value)


def _keys_of(model: type[BaseModel]) -> Iterator[str]:
    for name, field in model.model_fields.items():
        yield field.alias or name


def _field_at(model: type[BaseModel], loc: tuple[str | int, ...]) -> FieldInfo | None:
    parent = _model_at(model, loc[:-1])
    if parent is None or not loc or not isinstance(loc[-1], str):
        return None
    return next((f for n, f in parent.model_fields.items() if (f.alias or n) == loc[-1]), None)


def _model_at(model: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model whose keys the table at `loc` holds (list indexes are stepped over)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return None
        if isinstance(part, int):
            continue
        field = next((f for n, f in current.model_fields.items() if (f.alias or n) == part), None)
        current = _model_in(field.annotation) if field is not None else None
    return current


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model inside an annotation such as `Sub`, `Sub | None` or `ConfigList[Sub]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = get_origin(annotation)
    if origin is Annotated or origin in (Union, types.UnionType, tuple, list, set, frozenset):
        for arg in get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
