"""Data flows one way through the code: stages write their data files, report draws from files alone,
recipes turn TOML into the stages' configs and only the pipeline and the CLI read recipes."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mobileprune"
# What runs the stages (and may read recipes and ask report to draw); every other module is a stage
# (data, models, train, finegrained, channel, distill, export, evaluate, bench, package) or shared.
ORCHESTRATION = {"cli", "pipeline", "__main__", "__init__"}
SHARED = {"errors", "files"}
STAGES = sorted({p.stem for p in PACKAGE.glob("*.py")} - ORCHESTRATION - {"report", "recipes"})


def imported_modules(module: str) -> set[str]:
    """Every mobileprune module that ``module`` imports, at the top or inside a function."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif (node.module or "").startswith("mobileprune"):
                parts = node.module.split(".")
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mobileprune.")}
    return found


def test_the_import_scan_sees_local_and_absolute_imports(tmp_path, monkeypatch):
    (tmp_path / "probe.py").write_text("from .report import x\ndef f():\n    from mobileprune.recipes import y\n"
                                       "    import mobileprune.cli\n    from . import files\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    assert imported_modules("probe") == {"report", "recipes", "cli", "files"}


def test_the_stages_are_the_modules_named_in_developers_md():
    assert {"data", "models", "train", "finegrained", "channel", "export", "evaluate", "bench"} <= set(STAGES)


@pytest.mark.parametrize("module", STAGES)
def test_no_stage_imports_report_or_recipes(module):
    backwards = imported_modules(module) & ({"report", "recipes"} | ORCHESTRATION)
    assert not backwards, f"{module}.py imports {sorted(backwards)}: a stage writes files, report draws them"


def test_report_draws_from_files_alone():
    assert imported_modules("report") <= SHARED


def test_recipes_depend_on_stages_only_and_only_orchestration_reads_them():
    assert not imported_modules("recipes") & ({"report"} | ORCHESTRATION)
    readers = {p.stem for p in PACKAGE.glob("*.py") if "recipes" in imported_modules(p.stem)}
    assert readers <= ORCHESTRATION
