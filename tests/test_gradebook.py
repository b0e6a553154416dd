"""Grading a class of hand-ins from strangers: bounded unzipping, one row per submission, every edition."""
import csv
import os
import shutil
import zipfile

import pytest
import torch

from mobileprune import evaluate
from mobileprune.cli import main
from mobileprune.errors import MobilepruneError
from mobileprune.files import safe_extract
from mobileprune.models import build_mobilenet_v2

from conftest import write_cifar_bin


class RunsCode:
    """A pickle that would run a shell command when loaded."""

    def __reduce__(self):
        return os.system, ("echo pwned > /tmp/mobileprune-pwned",)


def _zip(path, members: dict):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_safe_extract_refuses_what_a_hostile_zip_tries(tmp_path):
    dest = tmp_path / "out"
    bomb = _zip(tmp_path / "bomb.zip", {"model/mobilenet.pth": b"\0" * (8 << 20)})  # ~1000-fold
    with pytest.raises(MobilepruneError, match="inflates .*-fold, more than the 200-fold allowed"):
        safe_extract(bomb, dest)
    many = _zip(tmp_path / "many.zip", {f"f{i}": b"x" for i in range(5)})
    with pytest.raises(MobilepruneError, match="5 members, more than the 4 allowed"):
        safe_extract(many, dest, max_members=4)
    with pytest.raises(MobilepruneError, match="uncompressed, more than"):
        safe_extract(bomb, dest, max_ratio=10_000, max_bytes=1 << 20)
    for name in ("../escape.txt", "/etc/escape.txt", "a/../../escape.txt"):
        with pytest.raises(MobilepruneError, match="would be written outside its folder"):
            safe_extract(_zip(tmp_path / "slip.zip", {name: b"x"}), dest)
    link = zipfile.ZipInfo("model/mobilenet.pth")
    link.external_attr = 0o120777 << 16  # a symlink to /etc/passwd
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as z:
        z.writestr(link, "/etc/passwd")
    with pytest.raises(MobilepruneError, match="is a link"):
        safe_extract(tmp_path / "link.zip", dest)
    whole = _zip(tmp_path / "whole.zip", {"model/mobilenet.pth": os.urandom(4096)})
    (tmp_path / "cut.zip").write_bytes(whole.read_bytes()[:3000])
    with pytest.raises(MobilepruneError, match="not a readable zip"):
        safe_extract(tmp_path / "cut.zip", dest)
    assert not (tmp_path / "escape.txt").exists() and not (dest.exists() and any(dest.iterdir()))
    # and a fair one comes out whole
    assert (safe_extract(whole, dest) / "model" / "mobilenet.pth").read_bytes() == \
        zipfile.ZipFile(whole).read("model/mobilenet.pth")


def test_safe_extract_stops_a_member_that_inflates_past_its_header(tmp_path):
    archive = _zip(tmp_path / "forged.zip", {"a.bin": b"x" * 5000})
    data = bytearray(archive.read_bytes())
    # Rewrite the uncompressed size in the central directory (offset 24 of its entry) to 100 bytes.
    central = data.rfind(b"PK\x01\x02")
    data[central + 24:central + 28] = (100).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    with pytest.raises(MobilepruneError, match="inflates past the 100 bytes its header claims|cannot extract"):
        safe_extract(archive, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())  # nothing half-written


def test_scores_by_rule_score_each_edition_from_its_own_measurement():
    scores = evaluate.scores_by_rule(45.0, {"torchvision": 0.93, "runner": 0.90}, {"torchvision": 0.91, "runner": 0.92})
    assert scores["original"] == {"accuracy": 0.92, "resize": "runner", "score": pytest.approx(45.0)}
    assert scores["revised"]["accuracy"] == scores["2025"]["accuracy"] == 0.93
    assert set(evaluate.scores_by_rule(45.0, {"torchvision": 0.9}, None)) == {"revised", "2025"}
    # measured under the other resize only: scored on it, and it says so
    assert evaluate.scores_by_rule(45.0, {"runner": 0.9}, None)["revised"]["resize"] == "runner"


def _hand_in(folder, model, pte=None, notebook=True):
    (folder / "model").mkdir(parents=True)
    torch.save(model, folder / "model" / "mobilenet.pth")  # as a student does
    if pte is not None:
        shutil.copy(pte, folder / "model" / "mobilenet.pte")
    if notebook:
        (folder / f"{folder.name}.ipynb").write_text("{}")
    archive = folder.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(folder.rglob("*")):
            z.write(f, f.relative_to(folder))
    shutil.rmtree(folder)
    return archive


@pytest.mark.slow
def test_grade_a_class_one_row_each_bad_ones_named_rerun_skips(tmp_path, pruned_model, pruned_pte, capsys):
    test_dir = tmp_path / "data"
    write_cifar_bin(test_dir / "test_batch.bin", 16, seed=5)
    hand_ins = tmp_path / "class"
    _hand_in(hand_ins / "1000001", pruned_model, pruned_pte)
    _hand_in(hand_ins / "1000002", pruned_model, notebook=False)  # the revised rules' layout, less its notebook
    thousand = build_mobilenet_v2(num_classes=1000)
    _hand_in(hand_ins / "1000003", thousand)
    (hand_ins / "1000004" / "model").mkdir(parents=True)
    torch.save({"weights": RunsCode()}, hand_ins / "1000004" / "model" / "mobilenet.pth")
    with zipfile.ZipFile(hand_ins / "1000004.zip", "w") as z:
        z.write(hand_ins / "1000004" / "model" / "mobilenet.pth", "model/mobilenet.pth")
    shutil.rmtree(hand_ins / "1000004")
    _zip(hand_ins / "1000005.zip", {"model/mobilenet.pth": b"\0" * (8 << 20)})  # a bomb
    (hand_ins / "1000006.zip").write_bytes((hand_ins / "1000001.zip").read_bytes()[:5000])  # truncated
    _zip(hand_ins / "1000007.zip", {"README.txt": b"forgot the model"})
    table = tmp_path / "out" / "scores.csv"

    assert main(["--no-progress", "grade", str(hand_ins), "--csv", str(table), "--data", str(test_dir)]) == 0
    rows = {r["id"]: r for r in csv.DictReader(open(table))}
    assert sorted(rows) == [f"100000{i}" for i in range(1, 8)]
    good = rows["1000001"]
    assert good["status"] == "graded" and good["model"] == "torchvision MobileNetV2 (strict track)"
    assert float(good["mflops"]) == pytest.approx(evaluate.count_mflops(pruned_model)[0], abs=1e-5)
    # the .pte and the .pth predict the same classes, under either resize here
    mflops, accuracy = float(good["mflops"]), float(good["pte_accuracy"])
    assert float(good["score_original"]) == pytest.approx(evaluate.lab_score(mflops, accuracy), abs=0.006)
    assert good["score_revised"] == good["score_2025"] != ""
    no_pte = rows["1000002"]
    assert no_pte["status"] == "graded" and no_pte["score_original"] == "" and no_pte["score_2025"] != ""
    assert "no ID.ipynb" in no_pte["notes"] and "no .pte" in no_pte["notes"]
    assert rows["1000003"]["status"] == "refused" and "Linear(..., 10)" in rows["1000003"]["reason"]
    assert rows["1000004"]["status"] == "refused" and "refused to unpickle" in rows["1000004"]["reason"]
    assert "1000004.zip" in rows["1000004"]["reason"] and "mobileprune-grade-" not in rows["1000004"]["reason"]
    assert rows["1000005"]["status"] == "refused" and "zip bomb" in rows["1000005"]["reason"]
    assert rows["1000006"]["status"] == "refused" and "truncated" in rows["1000006"]["reason"]
    assert rows["1000007"]["status"] == "refused" and "holds no mobilenet.pth" in rows["1000007"]["reason"]
    assert not os.path.exists("/tmp/mobileprune-pwned")
    summary = capsys.readouterr().out
    assert "7 submissions: 2 graded, 5 refused, 0 failed" in summary and "NOT THE LAB'S SCORES" in summary

    # A rerun grades only what is new; one out of time is a row with its reason, and nothing is left behind.
    _hand_in(hand_ins / "1000008", pruned_model)
    assert main(["--no-progress", "grade", str(hand_ins), "--csv", str(table), "--data", str(test_dir),
                 "--time-limit", "0.5"]) == 0
    rows = list(csv.DictReader(open(table)))
    assert len(rows) == 8 and rows[-1]["id"] == "1000008" and rows[-1]["status"] == "failed"
    assert "took more than 0.5 s (--time-limit)" in rows[-1]["reason"]
    assert "7 of 8 already graded" in capsys.readouterr().out


def test_grading_input_errors_are_one_line(tmp_path, pruned_model, capsys):
    bomb = _zip(tmp_path / "bomb.zip", {"model/mobilenet.pth": b"\0" * (8 << 20)})
    assert main(["grade", str(bomb)]) == 2
    assert "zip bomb" in capsys.readouterr().err
    hand_in = _hand_in(tmp_path / "1000001", pruned_model)
    (tmp_path / "afile").write_text("")
    assert main(["grade", str(hand_in), "--csv", str(tmp_path / "afile" / "scores.csv")]) == 2
    assert "cannot be written" in capsys.readouterr().err
    assert main(["grade", str(hand_in), str(bomb)]) == 2
    assert "add --csv" in capsys.readouterr().err
    bad_labels = tmp_path / "bad"
    write_cifar_bin(bad_labels / "test_batch.bin", 4)
    raw = bytearray((bad_labels / "test_batch.bin").read_bytes())
    raw[0] = 10  # a label out of range
    (bad_labels / "test_batch.bin").write_bytes(bytes(raw))
    assert main(["grade", str(hand_in), "--csv", str(tmp_path / "s.csv"), "--data", str(bad_labels)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "label" in err
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    assert main(["grade", str(hand_in), "--csv", str(tmp_path / "other.csv")]) == 2
    assert "not a table written by" in capsys.readouterr().err


def test_package_in_the_revised_layout_holds_the_pth_and_the_notebook(tmp_path, pruned_model, cifar_dir, capsys):
    from mobileprune.models import save_pickled_model
    from mobileprune.package import package

    save_pickled_model(pruned_model, tmp_path / "m" / "mobilenet.pth")  # no .pte: these rules need none
    (tmp_path / "nb.ipynb").write_text("{}")
    archive, result = package("0000000", tmp_path / "m", tmp_path, notebook=tmp_path / "nb.ipynb", data=cifar_dir,
                              progress=False, rules="revised")
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == ["0000000.ipynb", "model/mobilenet.pth"]
    assert set(result.scores) == {"revised", "2025"} and result.score == result.scores["revised"]["score"]
    assert "original       --     (no .pte to grade)" in evaluate.format_grade(result)
    assert main(["package", "--id", "0000001", "--model-dir", str(tmp_path / "m"), "--out", str(tmp_path),
                 "--rules", "revised", "--notebook", str(tmp_path / "none.ipynb")]) == 2
    assert "the revised rules hand in STUDENT_ID.ipynb" in capsys.readouterr().err
    assert not (tmp_path / "0000001.zip").exists()
