"""The released hand-ins still grade as README.md and release/REPORT.md state (real test set, CPU)."""
import json
from pathlib import Path

import pytest

from conftest import real_data_or_skip
from mobileprune.data import load_split
from mobileprune.evaluate import accuracy, count_mflops, lab_score
from mobileprune.export import PteModel
from mobileprune.models import load_model

RELEASE = Path(__file__).resolve().parents[1] / "release" / "h100"


def stated_grade(grade_json: Path, model_dir: Path) -> dict:
    """The grade a release states, once the .pth there has been counted and agrees with it."""
    stated = json.loads(grade_json.read_text())
    mflops, params = count_mflops(load_model(model_dir / "mobilenet.pth"))
    assert mflops == pytest.approx(stated["mflops"], abs=1e-6) and params == stated["params"]
    return stated


def test_h100_hand_in_grades_as_stated():
    """release/h100/prune (what `mobileprune package` takes): 80 MFLOPs with KD, pruned, then recovered three
    times more with `mobileprune recover`, on the CPU."""
    data = real_data_or_skip()
    stated = stated_grade(RELEASE / "grade.json", RELEASE / "prune")
    # The figures README.md quotes; a release that regresses (or a grade.json rewritten to match)
    # fails here.
    assert stated["mflops"] == pytest.approx(79.984046, abs=1e-6)
    assert stated["pte_accuracy"]["runner"] == pytest.approx(0.8949, abs=1e-4)
    assert stated["score"] == pytest.approx(23.55, abs=0.005)
    assert stated["score"] == pytest.approx(lab_score(stated["mflops"], stated["score_accuracy"]))
    images, labels = load_split(data, "test")
    measured = accuracy(PteModel(RELEASE / "prune" / "mobilenet.pte"), images, labels, "runner", batch_size=100,
                        progress=False)
    assert measured == pytest.approx(stated["pte_accuracy"]["runner"], abs=1e-4)


def test_h100_schedule_result_before_more_recovery_counts_as_stated():
    """release/h100/prune-schedule: what `mobileprune prune --recipe cpu-224-handin-kd` gave, before `recover`."""
    stated = stated_grade(RELEASE / "prune-schedule" / "grade.json", RELEASE / "prune-schedule")
    assert stated["mflops"] == pytest.approx(79.984046, abs=1e-6)
    assert stated["pte_accuracy"]["runner"] == pytest.approx(0.8488, abs=1e-4)
    assert stated["score"] == pytest.approx(2.80, abs=0.005)


def test_h100_hand_in_record_holds_the_schedule_and_every_recovery():
    """The hand-in's schedule.csv is the schedule's, then one `recover` row per round, each kept on validation."""
    from mobileprune.report import read_schedule

    rows = read_schedule(RELEASE / "prune" / "schedule.csv")
    assert rows[:-3] == read_schedule(RELEASE / "prune-schedule" / "schedule.csv")
    assert [r["step"] for r in rows[-3:]] == ["recover"] * 3
    rounds = [json.loads((RELEASE / name / "summary.json").read_text())
              for name in ("prune-recover-1", "prune-recover-2", "prune")]
    assert [r["val_finetuned"] for r in rows[-4:]] == [rounds[0]["val_before"]] + [r["val_accuracy"] for r in rounds]
    for before, after in zip(rounds, rounds[1:]):
        assert after["val_before"] == before["val_accuracy"]
    assert all(r["kept"] == "trained" for r in rounds)
    scores = [json.loads((RELEASE / name / "grade.json").read_text())["score"]
              for name in ("prune-recover-1", "prune-recover-2")]
    assert scores == [pytest.approx(17.83, abs=0.005), pytest.approx(20.62, abs=0.005)]


def test_h100_80_mflop_labels_alone_run_counts_as_stated():
    """release/h100/prune-80-labels: the hand-in before distillation (graded when it was released)."""
    stated = stated_grade(RELEASE / "prune-80-labels" / "grade.json", RELEASE / "prune-80-labels")
    assert stated["mflops"] == pytest.approx(79.984046, abs=1e-6)
    assert stated["pte_accuracy"]["runner"] == pytest.approx(0.8323, abs=1e-4)
    assert stated["score"] == pytest.approx(-4.62, abs=0.005)


def test_h100_20_mflop_run_counts_as_stated():
    """release/h100/prune-20: the one-shot 20-MFLOP run (its accuracy was graded when it was released)."""
    stated = stated_grade(RELEASE / "prune-20" / "grade.json", RELEASE / "prune-20")
    assert stated["mflops"] == pytest.approx(19.882301, abs=1e-6)
    assert stated["pte_accuracy"]["runner"] == pytest.approx(0.7083, abs=1e-4)


def test_h100_baseline_rebuilds_from_its_state_dict():
    summary = json.loads((RELEASE / "baseline" / "summary.json").read_text())
    model = load_model(RELEASE / "baseline" / "mobilenet.pt")
    assert count_mflops(model) == (pytest.approx(318.969098, abs=1e-6), 2236682)
    assert summary["test_accuracy"] == pytest.approx(0.9348, abs=1e-4)
