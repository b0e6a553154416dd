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
GPU_RELEASE = RELEASE.parent / "gpu"  # the GPU session's runs (lab2-45, lab2-20, Part 1 of recipe baseline)


def stated_grade(grade_json: Path, model_dir: Path) -> dict:
    """The grade a release states, once the .pth there has been counted and agrees with it."""
    stated = json.loads(grade_json.read_text())
    mflops, params = count_mflops(load_model(model_dir / "mobilenet.pth"))
    assert mflops == pytest.approx(stated["mflops"], abs=1e-6) and params == stated["params"]
    return stated


@pytest.mark.parametrize("release, mflops, runner_accuracy, score", [
    # release/gpu (what `mobileprune package` takes): lab2-45's steps on the GPU, its recovery, one
    # `mobileprune recover` and a `mobileprune average` of the last two on the CPU
    (GPU_RELEASE, 44.842538, 0.8941, 33.39),
    # release/h100, the hand-in before a GPU ran: 80 MFLOPs with KD, pruned, then recovered three times
    # more with `mobileprune recover`, all on the CPU
    (RELEASE, 79.984046, 0.8949, 23.55),
], ids=["gpu", "h100"])
def test_hand_in_grades_as_stated(release, mflops, runner_accuracy, score):
    """A released hand-in (grade.json beside prune/) states the figures README.md quotes, and its .pte,
    re-graded on the real test set, still scores them: a release that regresses (or a grade.json
    rewritten to match) fails here."""
    data = real_data_or_skip()
    stated = stated_grade(release / "grade.json", release / "prune")
    assert stated["mflops"] == pytest.approx(mflops, abs=1e-6)
    assert stated["pte_accuracy"]["runner"] == pytest.approx(runner_accuracy, abs=1e-4)
    assert stated["score"] == pytest.approx(score, abs=0.005)
    assert stated["score"] == pytest.approx(lab_score(stated["mflops"], stated["score_accuracy"]))
    images, labels = load_split(data, "test")
    measured = accuracy(PteModel(release / "prune" / "mobilenet.pte"), images, labels, "runner", batch_size=100,
                        progress=False)
    assert measured == pytest.approx(stated["pte_accuracy"]["runner"], abs=1e-4)


def test_gpu_runs_before_the_hand_in_count_as_stated():
    """release/gpu/prune-45 (lab2-45 before `recover`), prune-recover (after it) and prune-20 (recipe
    lab2-20, wholly on the GPU), graded when they were released; the hand-in's record is prune-45's
    schedule, one recover row and one average row, and the average is of exactly those two models."""
    import torch

    from mobileprune.models import interpolate_models
    from mobileprune.report import read_schedule

    for stage, mflops, runner, score in (("prune-45", 44.842538, 0.8904, 31.73),
                                         ("prune-recover", 44.842538, 0.8942, 33.44),
                                         ("prune-20", 19.888148, 0.8672, 28.53)):
        stated = stated_grade(GPU_RELEASE / stage / "grade.json", GPU_RELEASE / stage)
        assert stated["mflops"] == pytest.approx(mflops, abs=1e-6)
        assert stated["pte_accuracy"]["runner"] == pytest.approx(runner, abs=1e-4)
        assert stated["score"] == pytest.approx(score, abs=0.005)
    rows = read_schedule(GPU_RELEASE / "prune" / "schedule.csv")
    recovered = read_schedule(GPU_RELEASE / "prune-recover" / "schedule.csv")
    assert rows[:-1] == recovered and recovered[:-1] == read_schedule(GPU_RELEASE / "prune-45" / "schedule.csv")
    assert [r["step"] for r in rows[-2:]] == ["recover", "average"]
    recover = json.loads((GPU_RELEASE / "prune-recover" / "summary.json").read_text())
    assert recover["val_before"] == rows[-3]["val_finetuned"] and recover["val_accuracy"] == rows[-2]["val_finetuned"]
    hand_in = json.loads((GPU_RELEASE / "prune" / "summary.json").read_text())
    ends = hand_in["val_by_fraction"]
    assert (ends["0.0"], ends["1.0"]) == pytest.approx((rows[-3]["val_finetuned"], rows[-2]["val_finetuned"]), abs=1e-6)
    assert hand_in["val_accuracy"] == rows[-1]["val_finetuned"] == max(ends.values()) > max(ends["0.0"], ends["1.0"])
    first, second = (load_model(GPU_RELEASE / name / "mobilenet.pt") for name in ("prune-45", "prune-recover"))
    expected = interpolate_models(first, second, hand_in["fraction"]).state_dict()
    kept = load_model(GPU_RELEASE / "prune" / "mobilenet.pt").state_dict()
    assert all(torch.equal(kept[k], expected[k]) for k in expected)


def test_gpu_part1_sparsities_give_the_stated_size():
    """release/lab2-20/finegrained: its chosen per-layer sparsities, applied to a dense MobileNetV2, leave
    the size the summary states, within our bar of 20 % of dense (its accuracy was measured on the GPU)."""
    import torch

    from mobileprune.finegrained import FineGrainedPruner, read_sparsity_json, relative_size
    from mobileprune.models import build_mobilenet_v2

    summary = json.loads((GPU_RELEASE / "finegrained" / "summary.json").read_text())
    model = build_mobilenet_v2()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # no zeros but the pruned ones (fresh BatchNorm biases are 0)
            p.copy_(torch.randn_like(p))
    FineGrainedPruner(model, read_sparsity_json(GPU_RELEASE / "finegrained" / "sparsity.json")).apply(model)
    assert relative_size(model) == pytest.approx(summary["relative_size_after"], abs=1e-4)
    assert relative_size(model) <= 0.20 and summary["finetuned_test"] >= 0.93


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
