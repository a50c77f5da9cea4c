"""Recipes: TOML files mapped onto the components' typed dataclasses, plus ``--set`` overrides.

Every key is checked: an unknown one is an error listing the valid keys, a wrong type is an error
naming the key, the expected type and the value. No module reads this file's dicts directly.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from myriad.data.config import DataConfig
from myriad.engine.config import EngineConfig
from myriad.errors import UserError
from myriad.model.config import ModelConfig
from myriad.train.config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_RECIPE = "tiny-zh"


@dataclass(kw_only=True)
class RunConfig:
    """One run: a recipe's sections, each owned by its component."""

    name: str = DEFAULT_RECIPE
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


def shipped_recipes() -> list[str]:
    """Names of the recipes that ship inside the package."""
    folder = resources.files("myriad") / "recipes"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def recipe_path(name_or_path: str) -> Path:
    """Resolve a shipped recipe name or a path to a TOML file."""
    if name_or_path in shipped_recipes():
        return Path(str(resources.files("myriad") / "recipes" / f"{name_or_path}.toml"))
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file not found: {path}")
        return path
    raise UserError(
        f"unknown recipe {name_or_path!r}; shipped recipes: {', '.join(shipped_recipes())}"
    )


def load_recipe(
    name_or_path: str = DEFAULT_RECIPE, overrides: list[str] | None = None
) -> RunConfig:
    """Load a recipe, apply ``section.key=value`` overrides and validate the result."""
    path = recipe_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    raw.setdefault("name", path.stem)
    return build_config(raw, overrides or [], where=str(path))


def build_config(raw: dict[str, Any], overrides: list[str], where: str) -> RunConfig:
    """A validated ``RunConfig`` from a plain dict (recipe or a run's config.json) + overrides."""
    given: dict[str, Any] = {}
    for item in overrides:
        _apply_override(given, item)
    from_dict(RunConfig, given, where="--set")  # blame the override, not the recipe file
    for item in overrides:
        _apply_override(raw, item)
    cfg = from_dict(RunConfig, raw, where=where)
    cfg.model.validate()
    cfg.engine.validate()
    return cfg


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects section.key=value, got {item!r}")
    try:  # TOML literal syntax: 1e-3, true, "text", [1, 2]; a bare word is taken as a string
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    node = raw
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: {part!r} is a value, not a section")
    node[leaf] = value


def from_dict(cls: type, raw: dict[str, Any], where: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``raw``, rejecting unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in fields:
            valid = ", ".join(f"{prefix}{name}" for name in fields)
            raise UserError(f"{where}: unknown key {full!r}; valid keys: {valid}")
        kwargs[key] = _convert(hints[key], value, where, full)
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str, key: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise UserError(f"{where}: {key} must be a section (table), got {value!r}")
        return from_dict(hint, value, where, prefix=f"{key}.")
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if not ok:
        name = getattr(hint, "__name__", str(hint))
        raise UserError(f"{where}: {key} must be {name}, got {value!r}")
    return float(value) if hint is float else value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-dict form written next to checkpoints as JSON."""
    return dataclasses.asdict(cfg)
