"""``fedalign eval`` settings from the command line: ``key=value`` pairs, values YAML, keys dotted (``-`` and
``_`` alike), validated by a pydantic model; every problem is one line naming the key."""

from __future__ import annotations

from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from fedalign.errors import RecipeError

Settings = TypeVar("Settings", bound=BaseModel)


def parse_settings(overrides: list[str], model: type[Settings]) -> Settings:
    """``key=value`` pairs (values are YAML, keys dotted) into validated settings, one line per problem."""
    raw: dict[str, Any] = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise RecipeError(f"eval: {override!r}: expected key=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise RecipeError(f"eval: {key}: {value!r} is not a valid value") from None
        node = raw
        *parents, leaf = key.replace("-", "_").split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"eval: {key}: {part} is a value, not a section")
        node[leaf] = parsed
    try:
        return model(**raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RecipeError(f"eval: {where}: {first['msg']}") from None
