"""Recipes are data: TOML files under ``recipes/`` with one table per stage.

``[data]`` (val_size, seed, train_limit, test_limit), ``[baseline]`` (a TrainConfig),
``[finegrained]``, ``[prune]``, ``[recover]`` and ``[students]`` (see those modules), ``[teacher]``
and ``[distill]`` (see ``distill``). A name is looked up in ``./recipes`` and in
the project's own ``recipes/``; a path to a ``.toml`` file works too.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from .errors import MobilepruneError

PROJECT_RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def recipe_dirs() -> list[Path]:
    return [Path("recipes"), PROJECT_RECIPES]


def available() -> list[str]:
    return sorted({p.stem for d in recipe_dirs() if d.is_dir() for p in d.glob("*.toml")})


def load_recipe(name_or_path: str | Path) -> dict:
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = next((d / f"{name_or_path}.toml" for d in recipe_dirs() if (d / f"{name_or_path}.toml").is_file()), path)
    if not path.is_file():
        raise MobilepruneError(f"recipe {name_or_path!r} not found; available: {', '.join(available()) or 'none'}")
    try:
        recipe = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MobilepruneError(f"{path}: not valid TOML ({e})") from None
    recipe.setdefault("name", path.stem)
    try:
        check_recipe(recipe)
    except MobilepruneError as e:
        raise MobilepruneError(f"{path}: {e}") from None
    return recipe


def check_recipe(recipe: dict) -> None:
    """Parse every table the way its stage will, so that a typo fails at once, not an hour into a
    run (or on a lent GPU, whose minutes are counted)."""
    import inspect

    from .channel import PruneStepConfig, RecoveryConfig, ScheduleConfig, StudentsConfig, make_importance
    from .data import load_cifar10, resize_matrix
    from .distill import StudentConfig, TeacherConfig
    from .finegrained import parse_settings
    from .train import TrainConfig

    known_data = set(inspect.signature(load_cifar10).parameters) - {"folder", "test"}
    if set(recipe.get("data", {})) - known_data:
        raise MobilepruneError(f"unknown [data] settings {sorted(set(recipe['data']) - known_data)}; "
                               f"known: {sorted(known_data)}")
    trainings = []
    if "baseline" in recipe:
        trainings.append(TrainConfig.from_dict(recipe["baseline"]))
    if "finegrained" in recipe:
        trainings.append(parse_settings(recipe["finegrained"])["train"])
    if "prune" in recipe:
        schedule = ScheduleConfig.from_dict(dict(recipe["prune"]))
        make_importance(PruneStepConfig.from_dict(schedule.prune).importance)
        trainings += [TrainConfig.from_dict(t) for t in (schedule.finetune, schedule.recovery) if t]
    if "recover" in recipe:
        trainings.append(TrainConfig.from_dict(RecoveryConfig.from_dict(dict(recipe["recover"])).train))
    if "students" in recipe:
        make_importance(PruneStepConfig.from_dict(StudentsConfig.from_dict(dict(recipe["students"])).prune).importance)
    if "teacher" in recipe:
        TeacherConfig.from_dict(dict(recipe["teacher"]))
    if "distill" in recipe:
        StudentConfig.from_dict(dict(recipe["distill"]))
    if "demo" in recipe:
        unknown = set(recipe["demo"]) - {"hand_in", "baseline", "student_id", "bench_repeats"}
        if unknown or not {"hand_in", "baseline"} <= set(recipe["demo"]):
            raise MobilepruneError(f"[demo] needs hand_in and baseline and knows student_id and bench_repeats "
                                   f"(got {sorted(recipe['demo'])})")
    for config in trainings:
        variants = config.resize_variants
        for variant in [variants] if isinstance(variants, str) else variants:
            resize_matrix(variant, 2)  # an unknown resize names the known ones


def section(recipe: dict, name: str) -> dict:
    if name not in recipe:
        raise MobilepruneError(f"recipe {recipe.get('name')!r} has no [{name}] table")
    return dict(recipe[name])
