"""Named training recipes: commented YAML files in ``recipes/`` whose keys are
``TrainConfig`` fields. ``FINSENT_RECIPE=NAME`` (or ``finsent train --recipe``,
or the train DAG's ``recipe`` param) picks one; a path to a YAML file works too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    train: dict


def recipe_names(recipes_dir: Path | None = None) -> list[str]:
    return sorted(path.stem for path in (recipes_dir or RECIPES_DIR).glob("*.yaml"))


def recipe_path(name_or_path: str, recipes_dir: Path | None = None) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ValueError(f"recipe file {path} does not exist")
        return path.resolve()
    folder = recipes_dir or RECIPES_DIR
    named = folder / f"{name_or_path}.yaml"
    if not named.is_file():
        known = ", ".join(recipe_names(folder)) or f"none: {folder} holds no .yaml file"
        raise ValueError(f"no recipe named {name_or_path!r}; the named ones are {known}, or give a path to a .yaml file")
    return named


def load_recipe(name_or_path: str, recipes_dir: Path | None = None) -> Recipe:
    """The recipe's fields as written; ``Settings`` checks them against ``TrainConfig``.
    Names are looked up in ``recipes_dir`` (default: the repository's ``recipes/``)."""
    import yaml

    path = recipe_path(name_or_path, recipes_dir)
    train = yaml.safe_load(path.read_text()) or {}
    if not isinstance(train, dict):
        raise ValueError(f"recipe {path} must be a mapping of TrainConfig fields, not {type(train).__name__}")
    return Recipe(path.stem, path, train)
