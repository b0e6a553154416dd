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
