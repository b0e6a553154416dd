import pytest
import torch

from mobileprune.data import load_cifar10, preprocess
from mobileprune.errors import MobilepruneError
from mobileprune.models import build_mobilenet_v2
from mobileprune.train import TrainConfig, distillation_loss, recalibrate_batchnorm, train

from conftest import make_cifar_dir

TINY = dict(batch_size=20, lr=0.05, warmup_epochs=0.5, resolutions=[32], eval_resolution=32, eval_batch_size=50,
            label_smoothing=0.0)


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
