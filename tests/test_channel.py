import pytest
import torch

from mobileprune import channel
from mobileprune import train as train_module
from mobileprune.data import load_cifar10
from mobileprune.errors import MobilepruneError
from mobileprune.evaluate import count_mflops
from mobileprune.export import check_pte_matches, export_pte
from mobileprune.models import build_mobilenet_v2, load_pickled_model, save_pickled_model
from mobileprune.report import draw_plots

from conftest import make_cifar_dir, randomize_batchnorm


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return randomize_batchnorm(build_mobilenet_v2())


@pytest.fixture(scope="module")
def pruned45(dense):
    return channel.prune_to_mflops(dense, 45.0)


def test_lands_within_half_an_mflop_below_target(pruned45):
    mflops, _ = count_mflops(pruned45)
    assert 45.0 - channel.LANDING_TOLERANCE <= mflops <= 45.0


@pytest.mark.parametrize("settings", [dict(global_pruning=True), dict(resolution_weighting=0.5)])
def test_global_and_resolution_weighted_also_land(dense, settings):
    mflops, _ = count_mflops(channel.prune_to_mflops(dense, 60.0, channel.PruneStepConfig(**settings)))
    assert 60.0 - channel.LANDING_TOLERANCE <= mflops <= 60.0


def test_resolution_weighting_prunes_early_blocks_harder(dense):
    plain = channel.prune_to_mflops(dense, 60.0)
    weighted = channel.prune_to_mflops(dense, 60.0, channel.PruneStepConfig(resolution_weighting=0.5))
    early = lambda m: m.features[1].conv[0][0].out_channels + m.features[2].conv[0][0].out_channels
    late = lambda m: m.features[16].conv[0][0].out_channels
    assert early(weighted) < early(plain) and late(weighted) > late(plain)


def test_result_is_a_plain_mobilenet_that_reloads_with_the_same_mflops(pruned45, tmp_path):
    out = pruned45.eval()(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 10)  # residual connections consistent, classifier keeps 10 outputs
    assert pruned45.classifier[-1].out_features == 10
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pruned45.modules())
    save_pickled_model(pruned45, tmp_path / "mobilenet.pth")
    plain = torch.load(tmp_path / "mobilenet.pth", weights_only=False)  # the grader's torch.load
    safe = load_pickled_model(tmp_path / "mobilenet.pth")
    assert count_mflops(plain) == count_mflops(safe) == count_mflops(pruned45)
    assert torch.allclose(safe(torch.ones(1, 3, 224, 224)), pruned45(torch.ones(1, 3, 224, 224)))


def test_pte_of_schedule_result_equals_eager(pruned45, tmp_path):
    pte = export_pte(pruned45, tmp_path / "m.pte", check=False)
    assert check_pte_matches(pruned45, pte, samples=2) < 1e-3


def test_unreachable_or_bad_targets_are_clear(dense):
    with pytest.raises(MobilepruneError, match="not below"):
        channel.prune_to_mflops(dense, 400.0)
    with pytest.raises(MobilepruneError, match="cannot reach 1.00 MFLOPs"):
        channel.prune_to_mflops(dense, 1.0)
    with pytest.raises(MobilepruneError, match="unknown importance 'magic'"):
        channel.make_importance("magic")
    with pytest.raises(MobilepruneError, match="needs training data"):
        channel.prune_to_mflops(dense, 100.0, channel.PruneStepConfig(importance="taylor"))


def test_step_targets_fall_geometrically_to_the_target():
    targets = channel.step_targets(320.0, 20.0, 4)
    assert targets[-1] == 20.0 and len(targets) == 4
    ratios = [b / a for a, b in zip([320.0] + targets, targets)]
    assert all(r == pytest.approx(0.5) for r in ratios)


TINY_TRAIN = dict(epochs=1, batch_size=20, lr=0.01, warmup_epochs=0, resolutions=[32], eval_resolution=32, bf16=False,
                  eval_batch_size=50, kd_alpha=0.5)


def test_two_step_schedule_runs_and_resumes(dense, tmp_path):
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=16, test=8), val_size=20)
    config = channel.ScheduleConfig(target_mflops=100.0, steps=2, finetune=TINY_TRAIN, export=False,
                                    prune=dict(importance="taylor", gradient_batches=1, gradient_batch_size=4))
    out = tmp_path / "run"
    summary = channel.run_schedule(dense, data, config, out, progress=False)
    assert 100.0 - channel.LANDING_TOLERANCE <= summary["mflops"] <= 100.0
    # The stage writes its tables; the report draws the plots from them.
    assert (out / "schedule.csv").is_file() and (out / "channels.csv").is_file()
    assert sorted(p.name for p in draw_plots(out)) == ["channels.png", "schedule.png"]
    step1 = (out / "step_1" / "pruned.pt").stat().st_mtime_ns
    (out / "step_2" / "done.json").unlink()  # as if interrupted during step 2's fine-tune
    again = channel.run_schedule(dense, data, config, out, progress=False)
    assert (out / "step_1" / "pruned.pt").stat().st_mtime_ns == step1  # step 1 not redone
    assert again["mflops"] == summary["mflops"]
    rows = (out / "schedule.csv").read_text().splitlines()
    assert len(rows) == 1 + 3  # header, dense, two steps
    # What comes back from the GPU machine holds only the last finished step's model.
    (out / "step_1" / "finetune" / "best.pt").unlink()
    third = channel.run_schedule(dense, data, config, out, progress=False)
    assert third["mflops"] == summary["mflops"]


@pytest.mark.parametrize("criterion", ["taylor", "hessian"])
def test_gradient_criteria_land_on_target(dense, tmp_path, criterion):
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=8, test=4), val_size=4)
    config = channel.PruneStepConfig(importance=criterion, gradient_batches=1, gradient_batch_size=4)
    pruned = channel.prune_to_mflops(dense, 150.0, config, data)
    assert 150.0 - channel.LANDING_TOLERANCE <= count_mflops(pruned)[0] <= 150.0


def test_schedule_without_teacher_ignores_the_recipes_kd_alpha(dense, tmp_path, monkeypatch):
    # `mobileprune prune --no-distill` on a recipe whose fine-tune has kd_alpha > 0.
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=8, test=4), val_size=8)
    config = channel.ScheduleConfig(target_mflops=200.0, steps=1, distill=False, export=False,
                                    finetune=TINY_TRAIN, recovery=TINY_TRAIN)
    recalibrated = []  # (images, MFLOPs of the model) per call: after each prune step, on the pruned model
    real = train_module.recalibrate_batchnorm
    monkeypatch.setattr(train_module, "recalibrate_batchnorm",
                        lambda model, images, *a, **k: recalibrated.append((len(images), count_mflops(model)[0]))
                        or real(model, images, *a, **k))
    summary = channel.run_schedule(dense, data, config, tmp_path / "run", progress=False)
    assert summary["distill"] is False and summary["mflops"] <= 200.0
    assert (tmp_path / "run" / "recovery" / "best.pt").is_file()
    assert len(recalibrated) == 1 and recalibrated[0][0] == 32 and recalibrated[0][1] <= 200.0  # all 32 train images
    with pytest.raises(MobilepruneError, match="bn_recalibration_images"):
        channel.ScheduleConfig.from_dict({"target_mflops": 20.0, "bn_recalibration_images": -1})


def test_schedule_gives_each_stage_its_own_window_of_images(dense, tmp_path, monkeypatch):
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=8, test=4), val_size=8)  # 32 training images
    config = channel.ScheduleConfig.from_dict(dict(target_mflops=150.0, steps=2, export=False, images_per_step=12,
                                                   finetune=TINY_TRAIN, recovery=TINY_TRAIN))
    trained_on = []  # the training labels each stage's train() saw
    real = train_module.train
    monkeypatch.setattr(train_module, "train", lambda model, stage, *a, **k:
                        trained_on.append(stage.train_labels) or real(model, stage, *a, **k))
    summary = channel.run_schedule(dense, data, config, tmp_path / "run", progress=False)
    assert summary["images_per_step"] == 12
    windows = [torch.arange(12), torch.arange(12, 24), torch.arange(24, 36) % 32]  # steps 1, 2, recovery
    assert [t.tolist() for t in trained_on] == [data.train_labels[w].tolist() for w in windows]
    with pytest.raises(MobilepruneError, match="images_per_step"):
        channel.ScheduleConfig.from_dict({"target_mflops": 20.0, "images_per_step": 1.5})


def test_recover_trains_further_keeps_channels_and_resumes(dense, pruned45, tmp_path, monkeypatch):
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=8, test=4), val_size=8)  # 32 training images
    config = channel.RecoveryConfig.from_dict(dict(train=TINY_TRAIN, images=12, skip_images=28, export=False))
    trained_on = []
    real = train_module.train
    monkeypatch.setattr(train_module, "train", lambda model, stage, *a, **k:
                        trained_on.append(stage.train_labels) or real(model, stage, *a, **k))
    out = tmp_path / "recover"
    summary = channel.recover(pruned45, data, config, out, teacher=dense, progress=False)
    assert trained_on[0].tolist() == data.train_labels[torch.arange(28, 40) % 32].tolist()  # the window wraps
    assert summary["mflops"] == count_mflops(pruned45)[0] and summary["images"] == 12
    assert summary["kept"] in ("trained", "start")
    assert summary["val_accuracy"] == max(summary["val_before"], summary["val_trained"])
    result = load_pickled_model(out / "mobilenet.pth")
    assert count_mflops(result)[0] == summary["mflops"]
    # Rerun: the finished epoch and the starting validation are read back, not redone.
    trained = (out / "train" / "last.pt").stat().st_mtime_ns
    assert channel.recover(pruned45, data, config, out, teacher=dense, progress=False) == summary
    assert (out / "train" / "last.pt").stat().st_mtime_ns == trained


def test_recover_keeps_the_start_model_when_training_does_not_help(pruned45, tmp_path, monkeypatch):
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=8, test=4), val_size=8)
    config = channel.RecoveryConfig.from_dict(dict(train=TINY_TRAIN, distill=False, export=False))
    real = train_module.train

    def ruinous(model, *args, **kwargs):  # training that only does harm: the weights come back as noise
        result = real(model, *args, **kwargs)
        for p in result.model.parameters():
            p.data.normal_()
        result.best_val_accuracy = -1.0
        return result

    monkeypatch.setattr(train_module, "train", ruinous)
    summary = channel.recover(pruned45, data, config, tmp_path / "out", progress=False)
    assert summary["kept"] == "start" and summary["val_accuracy"] == summary["val_before"]
    kept = load_pickled_model(tmp_path / "out" / "mobilenet.pth")
    for a, b in zip(kept.state_dict().values(), pruned45.state_dict().values()):
        assert torch.equal(a, b)


def test_recover_needs_a_dense_teacher_and_known_settings(dense, pruned45, tmp_path):
    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=8, test=4), val_size=8)
    config = channel.RecoveryConfig(train=TINY_TRAIN, export=False)
    with pytest.raises(MobilepruneError, match="needs the dense model as teacher"):
        channel.recover(pruned45, data, config, tmp_path / "a", progress=False)
    with pytest.raises(MobilepruneError, match="not larger than the model"):
        channel.recover(dense, data, config, tmp_path / "b", teacher=pruned45, progress=False)
    with pytest.raises(MobilepruneError, match=r"unknown \[recover\] settings \['epochs'\]"):
        channel.RecoveryConfig.from_dict({"epochs": 3})
    with pytest.raises(MobilepruneError, match="skip_images"):
        channel.RecoveryConfig.from_dict({"skip_images": -1})


def test_recover_of_a_schedule_run_carries_its_record_forward(dense, tmp_path):
    from mobileprune.models import load_state_with_layout
    from mobileprune.report import find_stages, read_schedule

    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=8, test=4), val_size=8)
    run = tmp_path / "run"
    channel.run_schedule(dense, data, channel.ScheduleConfig(target_mflops=150.0, steps=1, export=False,
                                                             finetune=TINY_TRAIN), run, progress=False)
    config = channel.RecoveryConfig(train=TINY_TRAIN, export=False)
    out = tmp_path / "more"
    summary = channel.recover(load_state_with_layout(run / "mobilenet.pt"), data, config, out, teacher=dense,
                              progress=False, source_run=run)
    assert summary["target_mflops"] == 150.0 and summary["recovered_from"] == str(run)
    rows = read_schedule(out / "schedule.csv")
    assert rows[:-1] == read_schedule(run / "schedule.csv")
    assert rows[-1]["step"] == "recover" and rows[-1]["val_finetuned"] == summary["val_accuracy"]
    assert (out / "channels.csv").read_text() == (run / "channels.csv").read_text()
    stages = find_stages(tmp_path)
    assert out in stages["prune"] and out in stages["recover"] and run not in stages["recover"]
    with pytest.raises(MobilepruneError, match="not a Part 2 run folder"):
        channel.recover(load_state_with_layout(run / "mobilenet.pt"), data, config,
                        tmp_path / "x", teacher=dense, progress=False, source_run=tmp_path / "d")
