import pytest
import torch
import torchvision

from mobileprune import models
from mobileprune.errors import MobilepruneError


class NotMobileNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 10)


def test_dense_model_is_the_labs():
    model = models.build_mobilenet_v2()
    assert isinstance(model.classifier[0], torch.nn.Dropout) and model.classifier[0].p == 0.2
    assert (model.classifier[1].in_features, model.classifier[1].out_features) == (1280, 10)
    models.check_mobilenet_v2(model)


def test_safe_load_of_whole_pickled_model(tmp_path, pruned_model):
    torch.save(pruned_model, tmp_path / "m.pth")
    loaded = models.load_pickled_model(tmp_path / "m.pth")
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded.eval()(x), pruned_model.eval()(x))


def test_pickle_with_foreign_class_is_refused_with_its_name(tmp_path):
    torch.save(NotMobileNet(), tmp_path / "evil.pth")
    with pytest.raises(MobilepruneError, match=r"refused to unpickle test_models\.NotMobileNet"):
        models.load_pickled_model(tmp_path / "evil.pth")
    # Trusted, it unpickles, and is then refused for not being a MobileNetV2.
    with pytest.raises(MobilepruneError, match="not a torchvision MobileNetV2"):
        models.load_pickled_model(tmp_path / "evil.pth", trust_pickle=True)


def test_other_torchvision_model_is_refused(tmp_path):
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=10), tmp_path / "v3.pth")
    with pytest.raises(MobilepruneError, match="refused to unpickle .*mobilenetv3"):
        models.load_pickled_model(tmp_path / "v3.pth")


def test_truncated_and_wrong_files(tmp_path):
    torch.save(models.build_mobilenet_v2(), tmp_path / "m.pth")
    raw = (tmp_path / "m.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MobilepruneError, match="cut.pth: "):
        models.load_pickled_model(tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(MobilepruneError, match="not a torch.save file"):
        models.load_pickled_model(tmp_path / "text.pth")
    with pytest.raises(MobilepruneError, match="no such file"):
        models.load_pickled_model(tmp_path / "missing.pth")
    torch.save(models.build_mobilenet_v2().state_dict(), tmp_path / "sd.pth")
    with pytest.raises(MobilepruneError, match="holds a state_dict"):
        models.load_pickled_model(tmp_path / "sd.pth")


def test_state_dict_and_layout_rebuild_a_pruned_model_without_pickle(tmp_path, pruned_model):
    weights, layout = models.save_state_with_layout(pruned_model, tmp_path, "pruned")
    rebuilt = models.load_state_with_layout(weights)
    assert models.channel_layout(rebuilt) == models.channel_layout(pruned_model)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(rebuilt.eval()(x), pruned_model.eval()(x))
    assert rebuilt.features[1].conv[0][0].out_channels < 32  # really pruned


def test_a_stem_stride_is_recorded_in_the_layout_and_rebuilt(tmp_path):
    from mobileprune.evaluate import count_mflops

    dense = models.build_mobilenet_v2()
    models._STRIDES.clear()  # the reference strides are built on first use: without a draw from torch's generator
    torch.manual_seed(0)
    dense_layers = models.channel_layout(dense)["layers"]
    drawn_after_layout = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(drawn_after_layout, torch.rand(3))  # so a resumed run draws what an unbroken one drew
    assert not any("stride" in shape for shape in dense_layers.values())  # older layout files stay as they were
    model = models.set_stem_stride(models.build_mobilenet_v2(), 7)
    layers = models.channel_layout(model)["layers"]
    assert {name for name, shape in layers.items() if "stride" in shape} == {"features.0.0"}
    rebuilt = models.load_state_with_layout(models.save_state_with_layout(model, tmp_path, "s7")[0])
    assert rebuilt.features[0][0].stride == (7, 7)
    assert count_mflops(rebuilt)[0] == pytest.approx(26.050058)  # 318.97 at torchvision's stride 2
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(rebuilt.eval()(x), model.eval()(x))
    for bad in (0, 17, 2.5, True):
        with pytest.raises(MobilepruneError, match="stem stride must be a whole number"):
            models.set_stem_stride(models.build_mobilenet_v2(), bad)


def test_a_stride_plan_sets_the_cifar_layout_which_survives_its_layout_file(tmp_path):
    from mobileprune.evaluate import count_mflops

    model = models.set_strides(models.build_mobilenet_v2(), models.parse_stride_plan("features.0=7,features.2=1"))
    assert model.features[0][0].stride == (7, 7) and model.features[2].conv[1][0].stride == (1, 1)
    assert models.changed_strides(model) == {"features.0": 7, "features.2": 1} and models.track_of(model) == "open"
    assert models.track_of(models.build_mobilenet_v2()) == "strict"
    # maps of 32/32/16/8/4 px: 92.8 MFLOPs with every channel (issue #33), where stem 7 alone gives 26.05
    assert count_mflops(model)[0] == pytest.approx(92.8, abs=0.05)
    rebuilt = models.load_state_with_layout(models.save_state_with_layout(model, tmp_path, "cifar")[0])
    assert models.changed_strides(rebuilt) == {"features.0": 7, "features.2": 1}
    assert models.describe_strides(models.changed_strides(rebuilt)) == \
        "MobileNetV2, open track: features.0 stride 7, features.2 stride 1"
    for bad, message in (("features.3=1", "'features.3' is not a block that downsamples"),
                         ("features.2=9", "features.2 stride 9 must be a whole number from 1 to 4"),
                         ("features.0:7", "write BLOCK=STRIDE"), ("features.0=x", "each stride must be a whole number"),
                         ({"features.0": True}, "features.0 stride True")):
        with pytest.raises(MobilepruneError, match=message):
            models.parse_stride_plan(bad)


def test_layout_that_does_not_fit_its_weights(tmp_path, pruned_model):
    weights, _ = models.save_state_with_layout(pruned_model, tmp_path, "pruned")
    models.save_state_with_layout(models.build_mobilenet_v2(), tmp_path, "dense")
    (tmp_path / "pruned.layout.json").write_text((tmp_path / "dense.layout.json").read_text())
    with pytest.raises(MobilepruneError, match="does not fit pruned.layout.json"):
        models.load_state_with_layout(weights)


def test_truncated_state_dict_or_missing_layout_says_which_file_is_wrong(tmp_path, pruned_model):
    weights, layout = models.save_state_with_layout(pruned_model, tmp_path, "pruned")
    raw = weights.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "cut.layout.json").write_text(layout.read_text())
    with pytest.raises(MobilepruneError, match="cut.pt: not a torch.save file"):
        models.load_state_with_layout(tmp_path / "cut.pt")
    layout.unlink()
    with pytest.raises(MobilepruneError, match=r"pruned.layout.json: no such file \(a .pt state_dict"):
        models.load_model(weights)
    (tmp_path / "m.pte").write_bytes(b"\0" * 64)
    with pytest.raises(MobilepruneError, match="m.pte: an ExecuTorch program, not a PyTorch model"):
        models.load_model(tmp_path / "m.pte")


def test_interpolation_of_two_checkpoints(pruned_model):
    from conftest import randomize_batchnorm

    first = pruned_model
    second = randomize_batchnorm(models.interpolate_models(pruned_model, pruned_model, 1.0), seed=1)
    torch.nn.init.normal_(second.features[2].conv[0][0].weight)  # a conv differs too, not only BatchNorm
    a, b = first.state_dict(), second.state_dict()
    assert not torch.equal(a["features.2.conv.0.0.weight"], b["features.2.conv.0.0.weight"])
    for fraction, expect in ((0.0, a), (1.0, b)):
        mixed = models.interpolate_models(first, second, fraction).state_dict()
        assert all(torch.allclose(mixed[k].float(), expect[k].float()) for k in expect)
    half = models.interpolate_models(first, second, 0.25).state_dict()
    for name in ("features.2.conv.0.0.weight", "features.2.conv.0.1.running_var", "classifier.1.bias"):
        assert torch.allclose(half[name], 0.75 * a[name] + 0.25 * b[name], atol=1e-6)
    assert torch.equal(half["features.2.conv.0.1.num_batches_tracked"], b["features.2.conv.0.1.num_batches_tracked"])
    assert models.channel_layout(models.interpolate_models(first, second, 0.5)) == models.channel_layout(first)
    with pytest.raises(MobilepruneError, match="different channel layouts"):
        models.interpolate_models(first, models.build_mobilenet_v2(), 0.5)
    with pytest.raises(MobilepruneError, match="must be in"):
        models.interpolate_models(first, second, 1.5)
