"""The committed lab notebook: built from notebooks/build.py, executed, and still runs without error."""
import copy
import sys
from pathlib import Path

import nbformat
import pytest

from mobileprune.report import find_results

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "notebooks"))
import build  # noqa: E402

COMMITTED = nbformat.read(PROJECT / "notebooks" / "lab2.ipynb", as_version=4)


def test_committed_notebook_is_the_built_one_and_is_executed():
    built = build.build()
    assert [c.source for c in COMMITTED.cells] == [c.source for c in built.cells], \
        "notebooks/lab2.ipynb is stale: run `make notebook`"
    for cell in COMMITTED.cells:
        if cell.cell_type == "code":
            assert cell.outputs, f"cell without outputs: {cell.source[:60]!r}"
            assert not [o for o in cell.outputs if o.output_type == "error"]


@pytest.mark.slow
def test_notebook_executes_without_error(monkeypatch):
    monkeypatch.delenv("MOBILEPRUNE_RESULTS", raising=False)
    results = find_results(PROJECT, stages=("finegrained", "prune"))  # the best results with both parts
    executed = build.execute(copy.deepcopy(COMMITTED))
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert f"results: {results.relative_to(PROJECT)}" in text
    assert "matches the lab's expected mask: True" in text
    assert "sparsity 0.60 leaves 10 non-zeros of 25" in text
    assert "MFLOPs " in text and "score recomputed" in text


def test_find_results_explains_what_is_missing(tmp_path, monkeypatch):
    from mobileprune.errors import MobilepruneError

    monkeypatch.delenv("MOBILEPRUNE_RESULTS", raising=False)
    with pytest.raises(MobilepruneError, match="run `make run`"):
        find_results(tmp_path)
    monkeypatch.setenv("MOBILEPRUNE_RESULTS", str(tmp_path))
    with pytest.raises(MobilepruneError, match="needs prune/summary.json"):
        find_results(tmp_path)


def test_find_results_takes_the_first_folder_with_every_stage(tmp_path, monkeypatch):
    monkeypatch.delenv("MOBILEPRUNE_RESULTS", raising=False)
    for folder, stages in (("release", ["prune"]), ("runs/cpu-small", ["finegrained", "prune"])):
        for stage in stages:
            (tmp_path / folder / stage).mkdir(parents=True)
            (tmp_path / folder / stage / "summary.json").write_text("{}")
    assert find_results(tmp_path) == tmp_path / "release"  # the hand-in: Part 2 is enough
    assert find_results(tmp_path, ("finegrained", "prune")) == tmp_path / "runs/cpu-small"


def test_the_notebook_finds_the_project_wherever_it_is_opened(tmp_path, monkeypatch):
    """`jupyter execute` or `jupyter nbconvert --execute` from any folder: the notebook's first cell
    finds the checkout (the working folder or above, else where the package runs from)."""
    import nbconvert  # noqa: F401  (in the dev dependencies: `jupyter nbconvert --execute` works in the venv)

    from mobileprune.report import project_root

    for folder in (tmp_path, PROJECT / "notebooks", PROJECT):
        monkeypatch.chdir(folder)
        assert project_root() == PROJECT
    assert "PROJECT = project_root()" in COMMITTED.cells[1].source
