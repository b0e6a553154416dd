"""The report's one accuracy-against-MFLOPs plot: what goes into it, and that it is drawn."""
import json

import pytest

from mobileprune.report import PUBLIC_HAND_INS, lab_score, pareto_points, plot_pareto, write_report


GRADE = {"mflops": 44.8, "score_accuracy": 0.8941, "images": 10000, "score": 33.39,
         "pte_accuracy": {"torchvision": 0.8918, "runner": 0.8941}}


def write(folder, name, obj):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(obj))


def test_the_plot_takes_each_graded_or_tested_part2_result_and_marks_the_hand_in(tmp_path):
    write(tmp_path / "prune", "summary.json", {"target_mflops": 45, "mflops": 44.8, "test_accuracy": 0.8918,
                                               "test_images": 10000, "val_accuracy": 0.89})
    write(tmp_path / "prune", "grade.json", GRADE)  # its .pte under the runner's resize
    write(tmp_path / "prune-20", "summary.json", {"target_mflops": 20, "mflops": 19.9, "test_accuracy": 0.8674,
                                                  "test_images": 10000, "val_accuracy": 0.87})
    write(tmp_path / "smoke", "summary.json", {"target_mflops": 45, "mflops": 44.9, "test_accuracy": 0.2,
                                               "test_images": 200, "val_accuracy": 0.2})  # not the whole test set
    write(tmp_path / "student-18", "summary.json", {"target_mflops": 18, "mflops": 17.9, "test_accuracy": None,
                                                    "test_images": 0, "val_accuracy": 0.9})  # not tested yet
    write(tmp_path, "grade.json", GRADE)
    points, hand_in = pareto_points(tmp_path)
    assert sorted((p["label"], p["mflops"], p["accuracy"]) for p in points) == [("prune", 44.8, 0.8941),
                                                                                ("prune-20", 19.9, 0.8674)]
    assert hand_in == {"label": "hand-in", "mflops": 44.8, "accuracy": 0.8941}
    path = plot_pareto(points, tmp_path / "pareto.png", hand_in)
    assert path.stat().st_size > 20_000
    report = write_report(tmp_path).read_text()
    assert "![accuracy against MFLOPs](accuracy_vs_mflops.png)" in report
    assert (tmp_path / "accuracy_vs_mflops.png").stat().st_size > 20_000


def test_the_contours_are_the_lab_score_and_the_reference_points_are_the_public_hand_ins():
    assert lab_score(45, 0.92) == pytest.approx(45.0)
    assert lab_score(26.33, 0.9232) == pytest.approx(50.42, abs=0.01)  # the best public hand-in, 50.4
    assert lab_score(44.84, 0.892) == pytest.approx(32.45, abs=0.01)  # ours before this release, 32.5
    assert (26.33, 0.9232) in PUBLIC_HAND_INS and len(PUBLIC_HAND_INS) == 4


def test_the_report_shows_the_int8_grade_beside_the_fp32_one_and_the_latency_file(tmp_path):
    write(tmp_path / "prune", "grade.json", GRADE)
    write(tmp_path / "prune", "grade.int8.json", {**GRADE, "score": 32.94,
                                                  "pte_accuracy": {"torchvision": 0.8893, "runner": 0.8931}})
    (tmp_path / "prune" / "grade.int8.txt").write_text(".int8.pte         0.8893       0.8931\n")
    (tmp_path / "bench.txt").write_text("# mobileprune bench a.pte b.pte\nmodel  kind\n")
    report = write_report(tmp_path, plots=False).read_text()
    rows = [line for line in report.splitlines() if line.startswith("| `prune`")]
    assert rows == ["| `prune` | 44.80 | 0.8918 | 0.8941 | 10000 | 33.39 % |",
                    "| `prune` int8 | 44.80 | 0.8893 | 0.8931 | 10000 | 32.94 % |"]
    assert "`prune` int8:" in report and ".int8.pte         0.8893" in report
    assert "## Latency" in report and "# mobileprune bench a.pte b.pte" in report


def test_a_recalibration_is_listed_with_both_candidates_whether_or_not_it_came_from_a_part2_run(tmp_path):
    """`recalibrate` on any model (not only a Part 2 run's) gets a row: both candidates under both resizes."""
    val = {"as is": {"torchvision": 0.9032, "runner": 0.9006}, "recalibrated": {"torchvision": 0.9018, "runner": 0.8992}}
    alone = {"mflops": 25.94, "params": 157513, "recalibration_images": 10000, "seed": 0, "val_by_resize": val,
             "kept": "as is", "val_accuracy": 0.9032, "val_accuracy_runner": 0.9006, "test_accuracy": 0.8975,
             "test_images": 10000, "distill": False}
    write(tmp_path / "alone", "summary.json", alone)
    write(tmp_path / "carried", "summary.json", {**alone, "target_mflops": 26, "recovered_from": "runs/x"})
    report = write_report(tmp_path, plots=False).read_text()
    assert "## Part 2: BatchNorm re-estimated (`mobileprune recalibrate`)" in report
    rows = [line for line in report.splitlines() if line.startswith(("| `alone`", "| `carried`"))]
    assert "| `alone` | – | 25.94 | 10,000 | 0.9032 / 0.9006 | 0.9018 / 0.8992 | as is | 0.8975 | 10000 |" in rows
    assert "| `carried` | `runs/x` | 25.94 | 10,000 | 0.9032 / 0.9006 | 0.9018 / 0.8992 | as is | 0.8975 | 10000 |" in rows
