"""Distillation from a 32-px teacher, several students at once on a wall-clock budget: every path on the CPU.

A GPU lease has no time to debug: what the device will run (`mobileprune students`, `distill
--pack`, then `unpack`, `grade`, `report` here) runs here first on tiny data, in seconds.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_cifar_dir, tp_pruned_model
from mobileprune import distill
from mobileprune.errors import ScheduleStopped
from mobileprune.train import chunk
from mobileprune.cli import main
from mobileprune.data import augment_views, load_cifar10, preprocess
from mobileprune.errors import MobilepruneError
from mobileprune.files import pack, read_csv, unpack
from mobileprune.models import TeacherNet, load_state_with_layout, load_teacher, save_teacher

# fp32: runs compared with each other must not each measure their own precision ("auto", tested apart).
TINY_TEACHER = dict(widths=[8, 16, 16], depth=3, epochs=2, batch_size=40, eval_batch_size=50, lookahead=True,
                    bf16=False)
TINY_STUDENTS = dict(budget_s=600, reserve_s=0, max_epochs=2, batch_size=20, lr=0.01, warmup=0.1, resolution=32,
                     eval_batch_size=50, ema_decay=0.9, bf16=False)


class FakeClock:
    """Seconds that pass only when told: a wall-clock schedule, tested without waiting."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_distill_budget_by_steps_seconds_or_whichever_ends_first():
    clock = FakeClock()
    budget = distill.Budget(steps=100, seconds=60, clock=clock)
    assert budget.progress(50) == 0.5
    clock.now += 45
    assert budget.progress(50) == 0.75  # time runs ahead of steps
    clock.now += 30
    assert budget.progress(0) == 1.0 and budget.spent() == pytest.approx(75)
    resumed = distill.Budget(seconds=60, spent=30, clock=clock)  # a resumed run carries its seconds
    assert resumed.progress(0) == 0.5
    # Epochs left: by steps, or by seconds at the last epoch's pace, whichever ends first.
    assert resumed.epochs_left(0, steps_per_epoch=10, epoch_seconds=10) == 3
    assert distill.Budget(steps=100, seconds=600, clock=clock).epochs_left(60, 10, epoch_seconds=10) == 4
    # Less than one step's seconds left: the schedule is over, not one more epoch of a fraction of a step.
    clock.now += 25
    assert resumed.progress(0) < 1 and not resumed.done(0, step_seconds=4) and resumed.done(0, step_seconds=6)
    assert not distill.Budget(steps=10, clock=clock).done(9, step_seconds=1e9)  # a schedule in steps runs them all
    with pytest.raises(ValueError):
        distill.Budget()


def test_distill_lr_warms_up_then_falls_to_its_floor_when_the_budget_ends():
    factors = [distill.lr_factor(p, warmup=0.1, start=0.2, floor=0.05) for p in (0, 0.05, 0.1, 0.55, 1.0)]
    assert factors == pytest.approx([0.2, 0.6, 1.0, 0.525, 0.05])


def test_distill_teacher_saves_in_bf16_and_loads_back(tmp_path):
    teacher = TeacherNet([8, 16, 16], depth=3)
    teacher.init_whitening(torch.randn(8, 3, 32, 32))
    path = save_teacher(teacher, tmp_path / "teacher.pt")
    blob = torch.load(path, weights_only=True)
    assert blob["widths"] == [8, 16, 16] and all(v.dtype == torch.bfloat16 for v in blob["state"].values()
                                                 if v.is_floating_point())
    loaded = load_teacher(path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(x), teacher.eval()(x), atol=0.05)  # bf16 weights, float32 compute
    # The 2x2 whitening filters decorrelate the patches of the images they were set from.
    images = torch.randn(64, 3, 32, 32) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    teacher.init_whitening(images)
    out = torch.nn.functional.conv2d(images, teacher.whiten.weight[:12]).permute(1, 0, 2, 3).reshape(12, -1)
    assert torch.allclose(out @ out.T / out.shape[1], torch.eye(12), atol=0.05)
    for bad, message in ((tmp_path / "nosuch.pt", "no such file"), (tmp_path / "junk.pt", "not a torch.save file")):
        if "junk" in bad.name:
            bad.write_bytes(b"junk")
        with pytest.raises(MobilepruneError, match=message):
            load_teacher(bad)
    torch.save({"state": {}}, tmp_path / "other.pt")
    with pytest.raises(MobilepruneError, match="not a mobileprune teacher"):
        load_teacher(tmp_path / "other.pt")


def test_distill_teacher_trains_and_resumes_where_it_stopped(tmp_path):
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=24, test=8), val_size=20)
    config = distill.TeacherConfig.from_dict({**TINY_TEACHER, "epochs": 1})
    _, first = distill.train_teacher(data, config, tmp_path / "t", progress=False)
    assert first["steps"] == 2 and 0 <= first["val_accuracy"] <= 1 and first["val_accuracy_tta"] is not None
    # As if the run had been cut after epoch 1 of 2: the finished files go, last.pt stays.
    (tmp_path / "t" / "teacher.pt").unlink()
    (tmp_path / "t" / "summary.json").unlink()
    _, second = distill.train_teacher(data, distill.TeacherConfig.from_dict(TINY_TEACHER), tmp_path / "t",
                                      progress=False)
    history = read_csv(tmp_path / "t" / "history.csv")
    assert second["steps"] == 4 and second["epochs"] == 2
    assert [r["step"] for r in history] == [2, 4]  # epoch 1 kept from the first run, epoch 2 added


def _students(n: int = 2) -> dict:
    return {f"student-{i}": (tp_pruned_model(ratio=0.5 + 0.1 * i, seed=i), {"target_mflops": 100 - i, "mflops": 99.0,
                                                                            "params": 1, "val_accuracy": 0.1})
            for i in range(n)}


def test_distill_students_train_together_keep_their_best_and_resume_bit_for_bit(tmp_path, monkeypatch):
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=12, test=4), val_size=20, test=False)
    assert len(data.test_labels) == 0  # a distill run never looks at the test split
    teacher = TeacherNet([8, 16, 16], depth=2)
    config = distill.StudentConfig.from_dict(TINY_STUDENTS)
    whole = distill.train_students(_students(), teacher, data, config, tmp_path / "a", 600, progress=False,
                                   clock=FakeClock())
    assert whole["epochs"] == 2 and whole["epochs_per_student"] == 2 and set(whole["students"]) == set(_students())
    for name, row in whole["students"].items():
        summary = json.loads((tmp_path / "a" / name / "summary.json").read_text())
        history = (tmp_path / "a" / name / "history.csv").read_text().splitlines()
        assert len(history) == 3 and summary["val_accuracy"] == row["val_accuracy"]
        assert summary["kept"] in ("model", "ema") and summary["test_accuracy"] is None
        assert (tmp_path / "a" / name / "mobilenet.pt").is_file()

    # Killed during epoch 2 (after epoch 1's checkpoint), then run again: the same weights as unbroken.
    keep = distill._validate_and_keep

    def dies_in_epoch_two(student, epoch, *args):
        if epoch == 2:
            raise KeyboardInterrupt
        return keep(student, epoch, *args)

    monkeypatch.setattr(distill, "_validate_and_keep", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        distill.train_students(_students(), teacher, data, config, tmp_path / "b", 600, progress=False,
                               clock=FakeClock())
    monkeypatch.setattr(distill, "_validate_and_keep", keep)
    resumed = distill.train_students(_students(), teacher, data, config, tmp_path / "b", 600, progress=False,
                                     clock=FakeClock())
    assert resumed["students"] == whole["students"]
    for name in whole["students"]:
        a = torch.load(tmp_path / "a" / name / "mobilenet.pt", weights_only=True)
        b = torch.load(tmp_path / "b" / name / "mobilenet.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # A resume with other students is refused by name.
    with pytest.raises(MobilepruneError, match="a run of students"):
        distill.train_students(_students(3), teacher, data, config, tmp_path / "b", 600, progress=False)


def test_distill_stops_when_its_seconds_are_spent(tmp_path):
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=12, test=4), val_size=20, test=False)
    clock = FakeClock()
    teacher = TeacherNet([8, 16, 16], depth=2)
    original = teacher.forward

    def slow_forward(x):  # each batch takes 10 "seconds"
        clock.now += 10
        return original(x)

    teacher.forward = slow_forward
    config = distill.StudentConfig.from_dict({**TINY_STUDENTS, "max_epochs": 0})
    stage = distill.train_students(_students(1), teacher, data, config, tmp_path / "s", 35, progress=False,
                                   clock=clock)
    assert stage["steps"] == 4 and stage["epochs"] == 2  # 4 batches of 10 s in 35 s; epochs of 2 batches


def test_pack_and_unpack_check_every_piece_and_leave_nothing_half_written(tmp_path):
    run = tmp_path / "run"
    (run / "teacher").mkdir(parents=True)
    (run / "teacher" / "teacher.pt").write_bytes(torch.randint(0, 256, (300_000,), dtype=torch.uint8).numpy().tobytes())
    (run / "summary.json").write_text("{}")
    pieces = pack(run, ["teacher/teacher.pt", "summary.json"], tmp_path / "pack", piece_bytes=100_000)
    assert [p.name for p in pieces][-1] == "pack.json" and len(pieces) >= 3
    files = unpack(tmp_path / "pack", tmp_path / "back")
    assert {p.relative_to(tmp_path / "back").as_posix() for p in files} == {"teacher/teacher.pt", "summary.json"}
    assert (tmp_path / "back" / "teacher" / "teacher.pt").read_bytes() == (run / "teacher" / "teacher.pt").read_bytes()
    with pytest.raises(MobilepruneError, match="not empty"):
        unpack(tmp_path / "pack", tmp_path / "back")
    whole = pieces[0].read_bytes()
    pieces[0].write_bytes(whole[:-10])
    with pytest.raises(MobilepruneError, match="results.tgz.00: damaged"):
        unpack(tmp_path / "pack", tmp_path / "again")
    pieces[0].write_bytes(whole)
    pieces[1].unlink()
    with pytest.raises(MobilepruneError, match="pieces missing: results.tgz.01"):
        unpack(tmp_path / "pack", tmp_path / "again")
    assert not (tmp_path / "again").exists() and not list(tmp_path.glob(".again*"))
    with pytest.raises(MobilepruneError, match="more than 2 pieces"):
        pack(run, ["teacher/teacher.pt"], tmp_path / "small", piece_bytes=1000, max_pieces=2)


RECIPE = """description = "tiny distillation"
[data]
val_size = 20
[students]
targets = [150, 100]
bn_recalibration_images = 20
[teacher]
widths = [8, 16, 16]
depth = 2
epochs = 1
batch_size = 40
eval_batch_size = 50
tta_level = 1
[distill]
budget_s = 600
reserve_s = 0
max_epochs = 1
batch_size = 20
lr = 0.01
resolution = 32
eval_batch_size = 50
"""


@pytest.mark.slow
def test_distill_end_to_end_on_tiny_data_students_pack_unpack_grade_report(tmp_path, capsys):
    from mobileprune.evaluate import count_mflops
    from mobileprune.models import build_mobilenet_v2, changed_strides, load_model, save_pickled_model

    folder = make_cifar_dir(tmp_path / "d", per_batch=16, test=10)
    (tmp_path / "tiny.toml").write_text(RECIPE)
    save_pickled_model(build_mobilenet_v2().eval(), tmp_path / "dense.pth")
    common = ["--recipe", str(tmp_path / "tiny.toml"), "--data", str(folder), "--device", "cpu"]
    # One pruned student, the start and a strided one: each student costs an export on the way back.
    assert main(["--no-progress", "students", "--baseline", str(tmp_path / "dense.pth"), "--out",
                 str(tmp_path / "students"), "--targets", "100", "--with-start", *common]) == 0
    # An open-track student in the CIFAR layout: the stem reads the upsample at 32 px and features.2 keeps
    # that resolution (92.8 MFLOPs with every channel), cut to 20.
    assert main(["--no-progress", "students", "--baseline", str(tmp_path / "dense.pth"), "--out",
                 str(tmp_path / "students"), "--targets", "20", "--stem-stride", "7", "--strides", "features.2=1",
                 *common]) == 0
    records = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "students").glob("*/student.json")}
    assert set(records) == {"student-100", "student-318.97", "student-20-f0s7-f2s1"}
    assert not records.pop("student-318.97")["pruned"]  # the start itself, unpruned, too
    assert records["student-20-f0s7-f2s1"]["strides"] == {"features.0": 7, "features.2": 1}
    assert records["student-20-f0s7-f2s1"]["stem_stride"] == 7 and records["student-100"]["strides"] == {}
    assert all(r["target_mflops"] - 0.5 <= r["mflops"] <= r["target_mflops"] and r["pruned"] for r in records.values())
    assert all(r["start"] == str(tmp_path / "dense.pth") for r in records.values())

    # What the GPU machine runs: the teacher, both students, then the pack for the trip back.
    assert main(["--no-progress", "distill", "--students", str(tmp_path / "students"), "--out", str(tmp_path / "run"),
                 "--pack", str(tmp_path / "pack"), *common]) == 0
    out = capsys.readouterr().out
    assert "teacher: val" in out and "student-100" in out and "packed into" in out
    pieces = sorted((tmp_path / "pack").iterdir())
    assert len(pieces) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in pieces)
    assert (tmp_path / "run" / "distill.png").stat().st_size > 1000
    stage = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert stage["teacher"]["val_accuracy"] is not None and set(stage["students"]) == {*records, "student-318.97"}

    # Here again: unpack, .pth and .pte rebuilt, test accuracy measured, the hand-in chosen on validation.
    assert main(["--no-progress", "unpack", str(tmp_path / "pack"), "--out", str(tmp_path / "back"), "--data",
                 str(folder)]) == 0
    out = capsys.readouterr().out
    # Any but the strided one, which is not a hand-in: which wins on 8 tiny validation images is chance
    # (the unpruned start won once, with one thread a worker).
    assert re.search(r"by validation the hand-in is student-(100|318\.97):", out)
    assert ("the best on the open track with features.0 stride 7, features.2 stride 1 (not channel pruning alone, "
            "docs/method.md): student-20-f0s7-f2s1") in out
    student = tmp_path / "back" / "student-100"
    summary = json.loads((student / "summary.json").read_text())
    assert summary["test_images"] == 10 and 0 <= summary["test_accuracy"] <= 1
    assert {"mobilenet.pth", "mobilenet.pte", "channels.csv", "channels.png"} <= {p.name for p in student.iterdir()}
    assert main(["--no-progress", "grade", str(student), "--data", str(folder), "--json"]) == 0
    graded = json.loads(capsys.readouterr().out)
    assert graded["mflops"] == pytest.approx(summary["mflops"]) and graded["pte_accuracy"] is not None
    report = (tmp_path / "back" / "REPORT.md").read_text()
    assert "## Distillation: a 32-px teacher and 3 students" in report and "`student-100`" in report
    strided = load_model(tmp_path / "back" / "student-20-f0s7-f2s1" / "mobilenet.pth")  # the strides survive the trip
    assert changed_strides(strided) == {"features.0": 7, "features.2": 1} and 19.5 <= count_mflops(strided)[0] <= 20

    # A second distill into the same folder is done already; other students there are refused.
    assert main(["--no-progress", "distill", "--students", str(tmp_path / "students"), "--out", str(tmp_path / "run"),
                 *common]) == 0


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_distill.sh"
GPU_DATA_TOOL = Path(__file__).resolve().parents[2] / "shared" / "tools" / "gpu_data.py"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_distill_gpu_script_sets_up_from_carried_parts_runs_and_packs(tmp_path):
    """benchmarks/gpu_distill.sh as the lease's call C runs it, on tiny data on the CPU."""
    if not GPU_DATA_TOOL.is_file():
        pytest.skip(f"{GPU_DATA_TOOL} not found (../shared/tools)")
    from mobileprune.models import build_mobilenet_v2, save_pickled_model

    source = make_cifar_dir(tmp_path / "src", per_batch=16, test=10)
    subprocess.run([sys.executable, str(GPU_DATA_TOOL), "pack", str(source), str(tmp_path / "parts")], check=True,
                   capture_output=True)
    shutil.rmtree(tmp_path / "parts" / "test")  # the lease carries the training batches alone
    (tmp_path / "tiny.toml").write_text(RECIPE)
    save_pickled_model(build_mobilenet_v2().eval(), tmp_path / "dense.pth")
    data = tmp_path / "data" / "cifar-10-batches-bin"
    env = {**os.environ, "GPU_DATA": str(tmp_path / "parts"), "WHEELS": str(tmp_path / "no-wheels"),
           "DATA_DIR": str(data), "RECIPE": str(tmp_path / "tiny.toml"), "STUDENTS": str(tmp_path / "students"),
           "RUN": str(tmp_path / "run"), "OUT": str(tmp_path / "out"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    setup = subprocess.run(["bash", str(SCRIPT), "setup"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert sorted(p.name for p in data.iterdir()) == [f"data_batch_{i}.bin" for i in range(1, 6)]
    # One student: each cut of the dense model costs seconds, and the script packs any number alike.
    assert main(["--no-progress", "students", "--baseline", str(tmp_path / "dense.pth"), "--recipe",
                 str(tmp_path / "tiny.toml"), "--data", str(source), "--out", str(tmp_path / "students"),
                 "--targets", "100"]) == 0
    (tmp_path / "out").mkdir()
    run = subprocess.run(["bash", str(SCRIPT), "run", "300"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in (tmp_path / "run" / "distill.log").read_text()
    back = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert back[-1] == "pack.json" and len(back) <= 8
    names = {p.relative_to(tmp_path / "back").as_posix() for p in unpack(tmp_path / "out", tmp_path / "back")}
    assert {"teacher/teacher.pt", "student-100/mobilenet.pt", "student-100/history.csv", "summary.json", "last.pt",
            "distill.log"} <= names
    assert not any(name.startswith("teacher/last") for name in names)  # the teacher's optimiser stays there


class _Clock:
    """A fake clock that each call moves on by ``tick`` seconds: epochs take a known time."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_teacher_in_chunks_equals_one_unbroken_run(tmp_path, capsys):
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=24, test=8), val_size=20)
    config = distill.TeacherConfig.from_dict({**TINY_TEACHER, "epochs": 3})
    _, whole = distill.train_teacher(data, config, tmp_path / "whole", progress=False)
    # Chunks of 2.5 s on a clock that every read moves a second on: an epoch reads it several times,
    # so each chunk ends after one epoch (the next would not fit), at the boundary, with its state kept.
    chunks = 0
    while not (tmp_path / "cut" / "summary.json").is_file():
        chunks += 1
        clock = _Clock(tick=1.0)
        with chunk(2.5, clock=clock):
            try:
                _, cut = distill.train_teacher(data, config, tmp_path / "cut", progress=False, clock=clock)
            except ScheduleStopped as e:
                assert f"teacher after epoch {chunks} of 3" in str(e) and "Run the same command" in str(e)
        assert chunks <= 3
    assert chunks == 3
    assert cut["steps"] == whole["steps"] and cut["val_accuracy"] == whole["val_accuracy"]
    for a, b in zip(distill.load_teacher(tmp_path / "whole" / "teacher.pt").state_dict().values(),
                    distill.load_teacher(tmp_path / "cut" / "teacher.pt").state_dict().values()):
        assert torch.equal(a, b)
    assert [r["train_loss"] for r in read_csv(tmp_path / "cut" / "history.csv")] == \
        [r["train_loss"] for r in read_csv(tmp_path / "whole" / "history.csv")]


def test_epoch_lines_say_epoch_k_of_n_and_the_time_left(tmp_path, capsys):
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=24, test=8), val_size=20)
    config = distill.TeacherConfig.from_dict({**TINY_TEACHER, "epochs": 2})
    distill.train_teacher(data, config, tmp_path / "t", progress=False, clock=_Clock(tick=60.0))
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "teacher epoch 1/2" in text and "min left" in text and "teacher epoch 2/2" in text


def test_a_students_epoch_line_counts_the_time_left_to_whichever_ends_first(tmp_path, capsys):
    # --budget-s 2400 on a recipe of 16 epochs: the line must not promise the sixteen.
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=12, test=4), val_size=20, test=False)
    config = distill.StudentConfig.from_dict({**TINY_STUDENTS, "max_epochs": 50})
    distill.train_students(_students(1), TeacherNet([8, 16, 16], depth=2), data, config, tmp_path / "run", 3000,
                           progress=False, clock=_Clock(tick=100.0))
    lines = re.findall(r"students epoch \d+/50 \([\d.]+s, (\d+)s in all(?:, about (?:(\d+) h )?(\d+) min left)?\)",
                       "".join(capsys.readouterr()))
    assert len(lines) >= 2 and not lines[-1][2]  # the last epoch promises nothing more
    for spent, hours, minutes in lines[:-1]:
        # (the fake clock moves 100 s a call, so the line's own reading of the time is a few calls late)
        assert minutes and int(hours or 0) * 60 + int(minutes) <= (3000 - int(spent)) / 60 + 10


def test_the_teacher_cache_holds_the_targets_of_every_view_and_is_refused_for_another_teacher(tmp_path):
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=6, test=2), val_size=6, test=False)
    images = data.train_images
    teacher = TeacherNet([8, 16, 16], depth=2).eval()
    path = tmp_path / "t" / "cache.pt"
    for teacher_flip in (True, False):
        cache = distill.build_teacher_cache(teacher, images, path.with_name(f"{teacher_flip}.pt"), translate=1,
                                            teacher_flip=teacher_flip, bf16=False, batch_size=5, log=False)
        assert cache.dtype == torch.float16 and cache.shape == (len(images), 3, 3, 1 if teacher_flip else 2, 10)
        # What the students look up for a batch of views is what the teacher says of those views.
        views, dy, dx, flipped = augment_views(images, torch.Generator().manual_seed(1), pad=1)
        x = preprocess(views, 32)
        expected = distill.teacher_logits(teacher, x, 1 if teacher_flip else 0)
        looked_up = cache[torch.arange(len(images)), dy, dx, 0 if teacher_flip else flipped.long()].float()
        assert torch.allclose(looked_up, expected, atol=2e-3, rtol=1e-2)
        if teacher_flip:
            first_cache = cache
    # Built once: a second call reads it back; another teacher's weights are refused by digest.
    again = distill.build_teacher_cache(teacher, images, path.with_name("True.pt"), 1, True, False, log=False)
    assert torch.equal(again, first_cache)
    with pytest.raises(MobilepruneError, match="another teacher"):
        distill.build_teacher_cache(TeacherNet([8, 16, 16], depth=2), images, path.with_name("True.pt"), 1, True,
                                    False, log=False)


def test_the_teacher_cache_resumes_between_crop_offsets_and_students_train_from_it(tmp_path):
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=12, test=4), val_size=20, test=False)
    teacher = TeacherNet([8, 16, 16], depth=2).eval()
    whole = distill.build_teacher_cache(teacher, data.train_images, tmp_path / "a.pt", 1, True, False, log=False)
    with chunk(0.0001):  # each chunk ends after one crop offset
        with pytest.raises(ScheduleStopped, match="teacher cache after epoch 1 of 9"):
            distill.build_teacher_cache(teacher, data.train_images, tmp_path / "b.pt", 1, True, False, log=False)
    assert (tmp_path / "b.pt.partial").is_file() and not (tmp_path / "b.pt").is_file()
    resumed = distill.build_teacher_cache(teacher, data.train_images, tmp_path / "b.pt", 1, True, False, log=False)
    assert torch.equal(resumed, whole) and not (tmp_path / "b.pt.partial").exists()
    # The students read their targets from it: same batches, a run that says so in its summary.
    config = distill.StudentConfig.from_dict({**TINY_STUDENTS, "translate": 1, "teacher_cache": True, "budget_s": 0})
    stage = distill.run_distill(_students(1), data, distill.TeacherConfig.from_dict(TINY_TEACHER), config,
                                tmp_path / "run", teacher=_saved_teacher(teacher, tmp_path), progress=False)
    assert stage["epochs"] == 2 and stage["config"]["teacher_cache"] is True and stage["budget_s"] == 0
    assert (tmp_path / "run" / "teacher" / "logits-translate1-flipmean.pt").is_file()


def _saved_teacher(teacher, tmp_path) -> Path:
    save_teacher(teacher, tmp_path / "teacher.pt")
    return tmp_path / "teacher.pt"


def test_teacher_accuracies_at_every_level_from_one_pass_equal_each_level_alone(tmp_path):
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=12, test=4), val_size=30, test=False)
    teacher = TeacherNet([8, 16, 16], depth=2).eval()
    teacher.init_whitening(preprocess(data.train_images[:20], 32))
    by_level = distill.teacher_accuracies(teacher, data.val_images, data.val_labels, batch_size=7)
    assert by_level == {level: distill.teacher_accuracy(teacher, data.val_images, data.val_labels, level, 7)
                        for level in (0, 1, 2)}


def test_a_finished_teacher_is_released_with_its_test_accuracy_measured_once(tmp_path, capsys, monkeypatch):
    folder = make_cifar_dir(tmp_path / "d", per_batch=24, test=16)
    (tmp_path / "tiny.toml").write_text(RECIPE)  # its [teacher]: one epoch
    with pytest.raises(MobilepruneError, match="not finished"):
        distill.release_teacher(tmp_path / "nothing", tmp_path / "r", (None, None), (None, None), "", "")
    command = ["--no-progress", "teacher", "--recipe", str(tmp_path / "tiny.toml"), "--data", str(folder),
               "--device", "cpu", "--out", str(tmp_path / "run"), "--release", str(tmp_path / "release" / "teacher")]
    assert main(command) == 0
    assert "released:" in capsys.readouterr().out
    release = tmp_path / "release" / "teacher"
    assert sorted(p.name for p in release.iterdir()) == ["history.csv", "summary.json", "teacher.png", "teacher.pt"]
    assert (release / "teacher.pt").read_bytes() == (tmp_path / "run" / "teacher.pt").read_bytes()
    s = json.loads((release / "summary.json").read_text())
    assert s["command"] == "mobileprune " + " ".join(command) and s["machine"] and s["test_images"] == 16
    assert s["cpu_hours"] == pytest.approx(s["seconds"] / 3600) and len(s["epoch_seconds"]) == 1
    # The accuracies are those of the stored (bf16) weights, on the real splits of this data.
    data = load_cifar10(folder, val_size=20)
    stored = load_teacher(release / "teacher.pt")
    bf16 = s["measured_in"] == "bf16"  # as the run trained, where this CPU can
    assert s["test_accuracy"] == distill.teacher_accuracies(stored, data.test_images, data.test_labels, bf16=bf16)[0]
    assert s["val_accuracy_tta"] == distill.teacher_accuracies(stored, data.val_images, data.val_labels,
                                                               bf16=bf16)[s["tta_level"]]
    assert not list(release.parent.glob(".teacher*"))  # the temporary folder moved into place, nothing left
    # Again: the same teacher is not measured on the test set a second time.
    monkeypatch.setattr(distill, "teacher_accuracies", lambda *a, **k: pytest.fail("measured again"))
    assert main(command) == 0
    assert "already released" in capsys.readouterr().out
    assert json.loads((release / "summary.json").read_text()) == s
    assert main(["report", str(tmp_path / "release")]) == 0
    report = (tmp_path / "release" / "REPORT.md").read_text()
    assert "## The 32-px teacher (`teacher`)" in report and s["command"] in report and "teacher/teacher.png" in report


def test_students_train_on_a_resolution_schedule_and_are_validated_at_their_resolution(tmp_path):
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=12, test=4), val_size=20, test=False)
    config = distill.StudentConfig.from_dict({**TINY_STUDENTS, "max_epochs": 4, "budget_s": 0,
                                              "resolutions": [16, 16, 16, 32]})
    assert [config.resolution_at(f) for f in (0, 0.5, 0.74, 0.75, 1.0)] == [16, 16, 16, 32, 32]
    seen = []
    students = _students(1)
    model = students["student-0"][0]
    model.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].shape[-1])))
    distill.train_students(students, TeacherNet([8, 16, 16], depth=2), data, config, tmp_path / "run", None,
                           progress=False)
    trained = [size for training, size in seen if training]
    steps = len(trained) // 4  # the bf16 probe is off (bf16 false): every training forward is a step
    assert trained == [16] * (3 * steps) + [32] * steps
    # Epochs at the lab's size are validated (and chosen) there; one trained smaller only at its own size.
    assert {size for training, size in seen if not training} == {16, 32}
    history = read_csv(tmp_path / "run" / "student-0" / "history.csv")
    assert [r["train_resolution"] for r in history] == [16, 16, 16, 32]
    assert [r["val_at_train_resolution"] is not None for r in history] == [True, True, True, False]
    assert [r["val_accuracy"] is not None for r in history] == [False, False, False, True]
    for bad in ([0], "224", [224.0]):
        with pytest.raises(MobilepruneError, match="resolutions must be a list of positive pixel sizes"):
            distill.StudentConfig.from_dict({**TINY_STUDENTS, "resolutions": bad})


def test_bf16_is_measured_at_each_training_size_of_a_resolution_schedule(tmp_path, monkeypatch):
    # bf16 pays for a MobileNetV2 at 224 px and not at 112: one probe at the first size would run the
    # rest of a progressive schedule in the wrong precision. Here the (fake) probe says bf16 pays at 32 only.
    probed = []

    def probe(setting, model, size, *args, train=True, **kwargs):
        probed.append((size, train))
        return {"bf16": train and size == 32, "setting": setting, "fp32_images_per_s": 1.0,
                "bf16_images_per_s": 2.0 if size == 32 else 0.5}

    monkeypatch.setattr(distill, "choose_bf16", probe)
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=12, test=4), val_size=20, test=False)
    config = distill.StudentConfig.from_dict({**TINY_STUDENTS, "max_epochs": 2, "budget_s": 0, "bf16": "auto",
                                              "resolutions": [16, 32]})
    students = _students(1)
    steps = []
    students["student-0"][0].register_forward_pre_hook(
        lambda m, args: steps.append((args[0].shape[-1], torch.is_autocast_enabled("cpu"))) if m.training else None)
    distill.train_students(students, TeacherNet([8, 16, 16], depth=2), data, config, tmp_path / "run", None,
                           progress=False)
    assert [size for size, train in probed if train] == [16, 32]  # each size once, when it is first met
    assert {(16, False), (32, True)} == set(steps)
    summary = json.loads((tmp_path / "run" / "student-0" / "summary.json").read_text())
    assert summary["bf16"] == {"16": False, "32": True}
    precision = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["precision"]
    assert precision["student-0"]["bf16"] is False and precision["student-0 at 32 px"]["bf16"] is True


def test_a_trained_start_is_kept_when_no_epoch_beats_it(tmp_path, monkeypatch):
    # students --with-start: the hand-in itself, distilled further. If every epoch validates worse,
    # the file kept (and handed on) is the start, not the least bad epoch.
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=12, test=4), val_size=20, test=False)
    model, record = _students(1)["student-0"]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    validations = iter([0.9] + [0.5] * 10)  # the start, then every epoch (model and EMA)
    monkeypatch.setattr(distill, "student_accuracy", lambda *a, **k: next(validations))
    stage = distill.train_students({"student-0": (model, {**record, "pruned": False})}, TeacherNet([8, 16, 16], depth=2),
                                   data, distill.StudentConfig.from_dict(TINY_STUDENTS), tmp_path / "run", 600,
                                   progress=False, clock=FakeClock())
    assert stage["students"]["student-0"] == {**stage["students"]["student-0"], "val_accuracy": 0.9, "best_epoch": 0,
                                              "kept": "start"}
    kept = load_state_with_layout(tmp_path / "run" / "student-0" / "mobilenet.pt").state_dict()
    assert all(torch.equal(kept[k], start[k]) for k in start)
    # A pruned student (the usual case) has no such candidate: its best epoch is kept.
    validations = iter([0.2, 0.3] * 10)
    stage = distill.train_students(_students(1), TeacherNet([8, 16, 16], depth=2), data,
                                   distill.StudentConfig.from_dict(TINY_STUDENTS), tmp_path / "pruned", 600,
                                   progress=False, clock=FakeClock())
    assert stage["students"]["student-0"]["best_epoch"] >= 1


def test_a_shared_teacher_cache_is_built_alone_then_read_by_a_run(tmp_path, capsys):
    folder = make_cifar_dir(tmp_path / "d", per_batch=12, test=4)
    teacher = _saved_teacher(TeacherNet([8, 16, 16], depth=2).eval(), tmp_path)
    # No [teacher] table: a loaded teacher needs none.
    (tmp_path / "r.toml").write_text('description = "tiny"\n[data]\nval_size = 20\n[distill]\nbudget_s = 0\n'
                                     'max_epochs = 1\nbatch_size = 20\nresolution = 32\neval_batch_size = 20\n'
                                     'bf16 = false\nteacher_cache = true\ntranslate = 1\n')
    common = ["--no-progress", "distill", "--recipe", str(tmp_path / "r.toml"), "--data", str(folder), "--device",
              "cpu", "--teacher", str(teacher)]
    assert main(common + ["--cache-only"]) == 2
    assert "--cache-only needs --teacher, --cache-dir" in capsys.readouterr().err
    assert main(common + ["--cache-only", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "40 images x 9 crop offsets x 1 view(s)" in capsys.readouterr().out
    cache = tmp_path / "cache" / "logits-translate1-flipmean.pt"
    built = cache.stat().st_mtime_ns
    _write_student(tmp_path / "students")
    assert main(common + ["--students", str(tmp_path / "students"), "--cache-dir", str(tmp_path / "cache"),
                          "--out", str(tmp_path / "run")]) == 0
    assert cache.stat().st_mtime_ns == built and "crop offset" not in capsys.readouterr().err  # read, not rebuilt
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["teacher_cache"] is True


def _write_student(folder: Path) -> None:
    from mobileprune.files import write_json
    from mobileprune.models import save_state_with_layout

    save_state_with_layout(tp_pruned_model(ratio=0.7), folder / "student-9", "mobilenet")
    write_json(folder / "student-9" / "student.json", {"target_mflops": 9, "mflops": 9.0, "params": 1,
                                                       "val_accuracy": 0.1})


def test_students_without_targets_are_the_start_alone_or_a_one_line_refusal(tmp_path, capsys):
    from mobileprune.models import save_pickled_model

    folder = make_cifar_dir(tmp_path / "d", per_batch=8, test=4)
    save_pickled_model(tp_pruned_model(ratio=0.7).eval(), tmp_path / "hand-in.pth")
    (tmp_path / "r.toml").write_text('description = "tiny"\n[data]\nval_size = 10\n[students]\ntargets = []\n')
    common = ["--no-progress", "students", "--recipe", str(tmp_path / "r.toml"), "--data", str(folder), "--device",
              "cpu", "--baseline", str(tmp_path / "hand-in.pth"), "--out", str(tmp_path / "students")]
    assert main(common) == 2
    assert "targets are empty; give --targets or --with-start" in capsys.readouterr().err
    assert not (tmp_path / "students").exists()
    assert main(common + ["--with-start"]) == 0
    (record_path,) = (tmp_path / "students").glob("*/student.json")
    assert json.loads(record_path.read_text())["pruned"] is False


def test_a_milestone_carries_a_run_across_a_lost_runs_folder(tmp_path, capsys, monkeypatch):
    # A session may begin in a fresh checkout without runs/: the committed milestone (bf16) resumes the
    # run after its last epoch, and the same command does it.
    folder = make_cifar_dir(tmp_path / "d", per_batch=12, test=4)
    teacher = _saved_teacher(TeacherNet([8, 16, 16], depth=2).eval(), tmp_path)
    (tmp_path / "r.toml").write_text('description = "tiny"\n[data]\nval_size = 20\n[distill]\nbudget_s = 0\n'
                                     'max_epochs = 3\nbatch_size = 20\nresolution = 32\neval_batch_size = 20\n'
                                     'bf16 = false\nema_decay = 0.9\n')
    _write_student(tmp_path / "students")
    milestone, run = tmp_path / "milestones" / "tiny.pt", tmp_path / "run"
    command = ["--no-progress", "distill", "--recipe", str(tmp_path / "r.toml"), "--data", str(folder), "--device",
               "cpu", "--teacher", str(teacher), "--students", str(tmp_path / "students"), "--out", str(run),
               "--milestone", str(milestone)]
    validations = []
    measure = distill.teacher_accuracy
    monkeypatch.setattr(distill, "teacher_accuracy", lambda *a: validations.append(1) or measure(*a))
    for epoch in (1, 2):  # chunks of one epoch each
        assert main(command + ["--stop-after", "0.00001"]) == 75
        assert f"holds the run after epoch {epoch}; commit it" in capsys.readouterr().out
        assert len(read_csv(run / "student-9" / "history.csv")) == epoch  # drawn between chunks
    assert len(validations) == 1  # the loaded teacher is validated once per run, not at every chunk
    kept = torch.load(milestone, weights_only=True)
    assert kept["epoch"] == 2 and kept["last"]["students"]["student-9"]["model"]["features.0.0.weight"].dtype \
        == torch.bfloat16
    assert milestone.stat().st_size < 0.75 * (run / "last.pt").stat().st_size  # bf16: about half of fp32
    before = torch.load(run / "last.pt", weights_only=True)["students"]["student-9"]["history"]
    # Small enough to commit: no momenta, and a kept file equal to the EMA or the weights is a reference.
    saved = kept["last"]["students"]["student-9"]
    assert saved["optimizer"]["state"] == {} and saved["optimizer"]["param_groups"]
    state = torch.load(run / "last.pt", weights_only=True)["students"]["student-9"]
    best = torch.load(run / "student-9" / "mobilenet.pt", weights_only=True)
    same = distill._by_reference(best, state)
    assert kept["kept"]["student-9"].keys() - {"layout"} == same.keys()
    assert distill._by_reference(best, {"ema": best}) == {"same_as": "ema"}
    changed = {**best, "features.0.0.weight": best["features.0.0.weight"] + 1}
    assert distill._by_reference(changed, {"ema": best, "model": best}) == {"weights": changed}
    distill.restore_milestone(milestone, tmp_path / "restored")  # the kept file comes back either way
    restored = torch.load(tmp_path / "restored" / "student-9" / "mobilenet.pt", weights_only=True)
    assert all(torch.allclose(restored[k].float(), v.float(), rtol=1e-2, atol=1e-2) for k, v in best.items())

    shutil.rmtree(run)  # the work tree is lost; the milestone was committed
    assert main(command) == 0
    assert "restored" in capsys.readouterr().out
    history = read_csv(run / "student-9" / "history.csv")
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [r["val_accuracy"] for r in history[:2]] == [r["val_accuracy"] for r in before]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3
    assert torch.load(milestone, weights_only=True)["epoch"] == 3
    written = milestone.stat().st_mtime_ns
    assert main(command) == 0 and milestone.stat().st_mtime_ns == written  # done: nothing newer to keep
    # A run already further along than the milestone is not rolled back by it.
    assert distill.restore_milestone(milestone, run) is None

    for content, message in ((b"junk", "not a torch.save file"), (None, "not a distill milestone")):
        bad = tmp_path / "bad.pt"
        if content is None:
            torch.save({"epoch": 3}, bad)
        else:
            bad.write_bytes(content)
        assert main(command[:-1] + [str(bad), "--out", str(tmp_path / "other")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and not (tmp_path / "other").exists()
