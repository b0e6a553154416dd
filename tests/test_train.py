import pytest
import torch

from mobileprune.data import load_cifar10, preprocess
from mobileprune.errors import MobilepruneError
from mobileprune.models import build_mobilenet_v2
from mobileprune import train as train_module
from mobileprune.errors import ScheduleStopped
from mobileprune.train import TrainConfig, choose_bf16, chunk, distillation_loss, recalibrate_batchnorm, train

from conftest import make_cifar_dir

# fp32: runs compared with each other must not each measure their own precision ("auto", tested apart).
TINY = dict(batch_size=20, lr=0.05, warmup_epochs=0.5, resolutions=[32], eval_resolution=32, eval_batch_size=50,
            label_smoothing=0.0, bf16=False)


@pytest.fixture
def tiny_data(tmp_path):
    return load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=16, test=8), val_size=20)


def test_loss_falls_on_a_tiny_run(tiny_data, tmp_path):
    torch.manual_seed(0)
    config = TrainConfig(epochs=6, **TINY)
    result = train(build_mobilenet_v2(), tiny_data, config, tmp_path / "run", device="cpu", progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0] * 0.9, losses
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "history.csv").is_file()
    best = max(result.history, key=lambda h: h["val_accuracy"])
    assert result.best_epoch == best["epoch"] and result.best_val_accuracy == best["val_accuracy"]


class Interrupt(Exception):
    pass


def test_resume_continues_bit_for_bit(tiny_data, tmp_path):
    config = TrainConfig(epochs=3, **TINY)
    torch.manual_seed(0)
    straight = train(build_mobilenet_v2(), tiny_data, config, tmp_path / "a", device="cpu", progress=False)

    steps = {"n": 0}

    def stop_in_epoch_three(model):
        steps["n"] += 1
        if steps["n"] == 2 * 3 + 1:  # 3 steps an epoch: the first step of epoch three
            raise Interrupt

    torch.manual_seed(0)
    with pytest.raises(Interrupt):
        train(build_mobilenet_v2(), tiny_data, config, tmp_path / "b", device="cpu", progress=False,
              after_step=[stop_in_epoch_three])
    resumed = train(build_mobilenet_v2(), tiny_data, config, tmp_path / "b", device="cpu", progress=False,
                    resume=True)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_distillation_pulls_student_towards_teacher(tiny_data, tmp_path):
    logits = torch.randn(4, 10)
    assert distillation_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(torch.zeros(4, 10), logits, 4.0).item() > 0
    with pytest.raises(MobilepruneError, match="needs a teacher"):
        train(build_mobilenet_v2(), tiny_data, TrainConfig(epochs=1, kd_alpha=0.5, **TINY), tmp_path, device="cpu")
    teacher = build_mobilenet_v2()
    result = train(build_mobilenet_v2(), tiny_data, TrainConfig(epochs=1, kd_alpha=0.5, **TINY), tmp_path / "kd",
                   teacher=teacher, device="cpu", progress=False)
    assert result.history[0]["train_loss"] > 0


def test_unknown_recipe_setting_is_named():
    with pytest.raises(MobilepruneError, match=r"unknown training settings \['lr_max'\]"):
        TrainConfig.from_dict({"lr_max": 1})


def test_batchnorm_recalibration_measures_the_images_and_touches_nothing_else():
    torch.manual_seed(0)
    conv, norm = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
    model = torch.nn.Sequential(conv, norm, torch.nn.ReLU()).eval()
    norm.running_mean.fill_(5.0)  # statistics of some other model, as after pruning
    norm.running_var.fill_(9.0)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "batches" not in k}
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        features = conv(preprocess(images, 32))
    recalibrate_batchnorm(model, images, size=32, batch_size=10)
    # two equal batches: the average of their means is the mean over all images
    assert torch.allclose(norm.running_mean, features.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(norm.running_var, features.var((0, 2, 3)), rtol=0.05)
    assert norm.momentum == 0.1 and not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    with torch.no_grad():  # eval mode now normalises these features to zero mean, unit variance
        normalised = norm(features)
    assert normalised.mean().abs() < 1e-4 and normalised.var().item() == pytest.approx(1.0, rel=0.05)

    before = norm.running_mean.clone()
    recalibrate_batchnorm(model, images[:0], size=32)  # no images: statistics left as they are
    assert torch.equal(norm.running_mean, before)


def test_a_schedule_in_chunks_equals_one_unbroken_run(tiny_data, tmp_path):
    config = TrainConfig(epochs=3, **TINY)
    torch.manual_seed(0)
    straight = train(build_mobilenet_v2(), tiny_data, config, tmp_path / "a", device="cpu", progress=False)
    # A chunk of a millisecond ends after each epoch: three chunks, each resumed by the same call.
    stops = []
    for _ in range(3):
        torch.manual_seed(0)
        with chunk(0.001):
            try:
                chunked = train(build_mobilenet_v2(), tiny_data, config, tmp_path / "b", device="cpu",
                                progress=False, resume=True)
            except ScheduleStopped as e:
                stops.append(str(e))
    assert [s.split(" (")[0] for s in stops] == ["train after epoch 1 of 3; about 0 min left",
                                                 "train after epoch 2 of 3; about 0 min left"]
    assert [h["train_loss"] for h in chunked.history] == [h["train_loss"] for h in straight.history]
    for a, b in zip(straight.model.state_dict().values(), chunked.model.state_dict().values()):
        assert torch.equal(a, b)


def test_bf16_is_obeyed_when_set_and_measured_when_auto(monkeypatch):
    model = build_mobilenet_v2()
    cpu = torch.device("cpu")
    assert choose_bf16(True, model, 32, 8, cpu)["bf16"] is True
    assert choose_bf16(False, model, 32, 8, cpu)["bf16"] is False
    with pytest.raises(MobilepruneError, match="bf16 must be"):
        choose_bf16("yes", model, 32, 8, cpu)
    with pytest.raises(MobilepruneError, match="bf16 must be"):
        TrainConfig.from_dict({"bf16": "fast"})
    # auto on a CPU: bf16 only where it has kernels and is measured at least 5 % faster.
    monkeypatch.setattr(train_module, "bf16_supported", lambda device: True)
    for fp32_rate, bf16_rate, chosen in ((100.0, 180.0, True), (100.0, 103.0, False), (300.0, 200.0, False)):
        monkeypatch.setattr(train_module, "training_rate",
                            lambda m, size, batch, device, bf16, *a, **k: bf16_rate if bf16 else fp32_rate)
        record = choose_bf16("auto", model, 32, 8, cpu)
        assert record == {"setting": "auto", "bf16": chosen, "fp32_images_per_s": fp32_rate,
                          "bf16_images_per_s": bf16_rate}
    monkeypatch.setattr(train_module, "bf16_supported", lambda device: False)
    assert choose_bf16("auto", model, 32, 8, cpu)["bf16"] is False


def test_the_bf16_probe_changes_neither_the_model_nor_what_the_run_draws():
    model = build_mobilenet_v2().train()
    before = [t.clone() for t in model.state_dict().values()]
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    rate = train_module.training_rate(model, 32, 4, torch.device("cpu"), bf16=False, steps=1)
    assert rate > 0 and torch.equal(torch.rand(3), expected)
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))


def test_a_stopped_chunk_exits_75_with_one_line(capsys):
    from mobileprune.errors import ScheduleStopped, exit_code

    def stop():
        raise ScheduleStopped("teacher: epoch 3 of 34 done; run the same command to go on")

    assert exit_code("mobileprune", stop) == 75
    assert capsys.readouterr().err == "mobileprune: stopped: teacher: epoch 3 of 34 done; run the same command to go on\n"


def test_kept_freed_memory_is_not_faulted_in_again_every_step():
    # A step frees its activations and allocates the same sizes again: with glibc's defaults each
    # 64-MB block goes back to the kernel and every page faults in anew (docs/method.md).
    import subprocess
    import sys

    probe = ("import resource, sys, torch\n"
             "from mobileprune.train import keep_freed_memory\n"
             "assert sys.argv[1] == 'default' or keep_freed_memory()\n"
             "torch.ones(1 << 24).sum()\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "for _ in range(10):\n"
             "    torch.ones(1 << 24).sum()\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    faults = {mode: int(subprocess.run([sys.executable, "-c", probe, mode], check=True, capture_output=True,
                                       text=True).stdout.split()[-1]) for mode in ("default", "kept")}
    if faults["default"] < 10 * (1 << 24) * 4 // 4096 // 2:
        pytest.skip(f"this libc does not return freed blocks to the kernel ({faults})")
    assert faults["kept"] < faults["default"] / 5, faults  # measured: 16,384 against 163,850
