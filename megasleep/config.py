"""Typed, validated YAML configs with dotted command-line overrides: the one config loader.

Every config class derives from :class:`StrictModel` (pydantic, unknown keys forbidden). Files are
read by :func:`read_config_file` (YAML, or JSON for exported ``config.json``), overrides applied by
:func:`apply_overrides`, and :func:`validate` turns any validation problem into one
:class:`ConfigError` naming the file and the dotted key, e.g.::

    configs/models/tiny.yaml: model.attn.n_heads: 5 heads do not divide d_model=64

:func:`load_config` chains the three for one schema; the model and experiment loaders
(``megasleep.models.config``, ``megasleep.train.config``) are the same chain plus how their sections
nest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)
REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the file and the key."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"sleep.passes=4"`` -> (["sleep", "passes"], 4); the value is parsed as YAML (ints, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. sleep.passes=4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Set each dotted ``key=value`` in a nested dict (creating sections as needed)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file as a mapping: YAML, or JSON for ``*.json`` (exported ``config.json``, DeepSpeed's;
    parsed as JSON because YAML 1.1 reads ``1e-05`` as a string)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    is_json = path.suffix == ".json"
    try:
        data = json.loads(path.read_text()) if is_json else yaml.safe_load(path.read_text()) or {}
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {'JSON' if is_json else 'YAML'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be {'an object' if is_json else 'a mapping'}, "
                          f"got {type(data).__name__}")
    return data


read_yaml = read_config_file  # the older name


def resolve_path(path: str | Path, relative_to: Path | None = None) -> Path:
    """A config-referenced file: as given (absolute or from the cwd), else next to the referencing
    file, else from the repository root (so `configs/...` works from any directory)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    for base in (relative_to, REPO_ROOT):
        if base is not None and (base / p).exists():
            return base / p
    return p


def deep_update(dst: dict, src: Mapping) -> dict:
    """Merge ``src`` into ``dst`` recursively (mappings merge, everything else replaces)."""
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def format_validation_error(exc: ValidationError, source: str, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "value_error":  # our own validators: the message names the keys and values
            msg = msg.removeprefix("Value error, ")
            if not err["loc"]:
                lines.append(f"{source}: {msg}" if not prefix else f"{source}: {prefix}: {msg}")
                continue
        elif "input" in err and err["type"] not in ("missing",):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{source}: {key or '<root>'}: {msg}")
    return "\n".join(lines)


def validate(schema: type[T], data: Mapping[str, Any], source: str = "<config>", prefix: str = "") -> T:
    """Validate a dict against ``schema``; raise ConfigError naming ``source`` and the dotted key."""
    try:
        return schema.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, prefix)) from None


def load_config(schema: type[T], path: str | Path | None = None, overrides: Iterable[str] = (),
                base: Mapping[str, Any] | None = None) -> T:
    """Load ``path`` (YAML) over ``base``, apply dotted overrides, validate against ``schema``."""
    data: dict[str, Any] = dict(base or {})
    source = "<defaults>"
    if path is not None:
        data.update(read_config_file(path))
        source = str(path)
    overrides = list(overrides)
    if overrides:
        apply_overrides(data, overrides)
        source += " (with overrides " + " ".join(overrides) + ")"
    return validate(schema, data, source)
