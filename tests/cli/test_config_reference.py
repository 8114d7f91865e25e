"""docs/operations.md, "Configuration reference", names every key of the configuration model with its default:
a key added to gateway/config_schema.py without a line there fails this test."""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from gateway.config_schema import GatewayConfig

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def _keys(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, object]]:
    """Dotted keys of the model's leaves, with their defaults (None when required or a factory)."""
    for name, field in model.model_fields.items():
        sub = next((a for a in (field.annotation, *typing.get_args(field.annotation))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if name == "agents":  # dict[agent name, AgentSection]
            yield from _keys(typing.get_args(field.annotation)[1], f"{prefix}agents.<name>.")
        elif sub is not None:
            yield from _keys(sub, f"{prefix}{name}.")
        else:
            required = field.is_required() or field.default_factory is not None
            yield f"{prefix}{name}", None if required else field.get_default()


def _reference() -> dict[str, str]:
    text = OPERATIONS.read_text()
    section = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    return {m[1]: m[2] for m in re.finditer(r"^\| `([^`]+)` \| ([^|]+) \|", section, re.M)}


def test_every_configuration_key_is_in_the_reference_with_its_default() -> None:
    ref = _reference()
    keys = dict(_keys(GatewayConfig))
    assert len(keys) > 25
    assert sorted(set(keys) - set(ref)) == [], "keys missing from docs/operations.md, Configuration reference"
    assert sorted(set(ref) - set(keys)) == [], "keys in the reference that the configuration does not have"
    for key, default in keys.items():
        value = getattr(default, "value", default)  # (enums)
        if value is None or isinstance(value, Path) or value == []:
            continue
        assert f"`{value}`" in ref[key], f"{key}: the reference gives {ref[key]!r}, the default is {value!r}"
