"""Read systemd unit files the way systemd does for the directives we check: sections, repeated keys in order,
comments, backslash line continuation, and the empty assignment that resets a list (`ExecStart=`)."""

from __future__ import annotations

import shlex
from pathlib import Path

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(path: Path) -> Unit:
    unit: Unit = {}
    section: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], [])
            continue
        if section is None or "=" not in line:
            raise ValueError(f"{path}: cannot parse {line!r}")
        key, _, value = line.partition("=")
        section.append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    """Every value of `key` in order, after the last empty assignment (which resets the list)."""
    out: list[str] = []
    for k, v in unit.get(section, []):
        if k == key:
            out = [] if v == "" else [*out, v]
    return out


def value(unit: Unit, section: str, key: str) -> str | None:
    vals = values(unit, section, key)
    return vals[-1] if vals else None


def has_key(unit: Unit, section: str, key: str) -> bool:
    return any(k == key for k, _ in unit.get(section, []))


def exec_argv(line: str, specifiers: dict[str, str]) -> list[str]:
    """Split an Exec*= line into argv: strip the prefixes (@-:+!), expand the %-specifiers we use, undo `$$`."""
    while line and line[0] in "@-:+!|":
        line = line[1:]
    out = []
    for word in shlex.split(line):
        for spec, repl in specifiers.items():
            word = word.replace(f"%{spec}", repl)
        out.append(word.replace("%%", "%").replace("$$", "$"))
    return out


def environment(unit: Unit) -> dict[str, str]:
    env: dict[str, str] = {}
    for v in values(unit, "Service", "Environment"):
        for item in shlex.split(v):
            name, _, val = item.partition("=")
            env[name] = val
    return env


def credentials(unit: Unit) -> dict[str, Path]:
    """LoadCredential=ID:PATH entries."""
    out = {}
    for v in values(unit, "Service", "LoadCredential"):
        name, _, src = v.partition(":")
        out[name] = Path(src)
    return out
