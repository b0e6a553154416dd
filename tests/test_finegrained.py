import json

import pytest
import torch
from torch import nn

from mobileprune import finegrained as fg
from mobileprune.data import preprocess
from mobileprune.errors import MobilepruneError
from mobileprune.models import build_mobilenet_v2

# The lab's check tensor.
LAB_TENSOR = torch.tensor([[-0.46, -0.40, 0.39, 0.19, 0.37],
                           [0.00, 0.40, 0.17, -0.15, 0.16],
                           [-0.20, -0.23, 0.36, 0.25, 0.03],
                           [0.24, 0.41, 0.07, 0.13, -0.15],
                           [0.48, -0.09, -0.36, 0.12, 0.45]])
LAB_MASK_075 = torch.tensor([[1, 1, 0, 0, 0],
                             [0, 1, 0, 0, 0],
                             [0, 0, 0, 0, 0],
                             [0, 1, 0, 0, 0],
                             [1, 0, 0, 0, 1]], dtype=torch.float32)


def test_lab_5x5_check():
    t = LAB_TENSOR.clone()
    mask = fg.fine_grained_prune(t, 0.75)
    assert torch.equal(mask, LAB_MASK_075)
    assert torch.equal(t, LAB_TENSOR * LAB_MASK_075)
    # The sparsity that leaves exactly 10 non-zeros of 25.
    t = LAB_TENSOR.clone()
    fg.fine_grained_prune(t, 0.6)
    assert int(t.count_nonzero()) == 10


def test_sparsity_zero_and_one():
    t = LAB_TENSOR.clone()
    assert fg.fine_grained_prune(t, 0.0).all() and torch.equal(t, LAB_TENSOR)
    assert not fg.fine_grained_prune(t, 1.0).any() and not t.any()


def test_masks_stay_zero_through_optimiser_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10))
    pruner = fg.FineGrainedPruner(model, {"0.weight": 0.5, "2.weight": 0.9})
    zeros = {n: (p == 0) for n, p in model.named_parameters() if n in pruner.masks}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        loss = model(torch.randn(4, 3, 8, 8)).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner(model)
    for name, p in model.named_parameters():
        if name in zeros:
            assert (p[zeros[name]] == 0).all()
            assert (p[~zeros[name]] != 0).any()
    assert model[2].weight.count_nonzero() == round(model[2].weight.numel() * 0.1)
    with pytest.raises(MobilepruneError, match="not prunable"):
        fg.FineGrainedPruner(model, {"0.bias": 0.5})


def test_size_in_bits_for_a_known_sparsity():
    model = torch.nn.Linear(100, 10, bias=False)
    assert fg.model_size_bits(model) == 1000 * 32
    fg.FineGrainedPruner(model, {"weight": 0.75})
    assert fg.model_size_bits(model, count_nonzero_only=True) == 250 * 32
    assert fg.model_size_bits(model, data_width=8, count_nonzero_only=True) == 250 * 8
    assert fg.relative_size(model) == pytest.approx(0.25)
    assert fg.model_sparsity(model) == pytest.approx(0.75)


def _fake_scan(model, sensitive: set[str]):
    sparsities = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    accuracy = {}
    for name in fg.prunable_parameters(model):
        per_step = 0.1 if name in sensitive else 0.001
        accuracy[name] = [0.9 - per_step * (i + 1) for i in range(len(sparsities))]
    return {"dense": 0.9, "sparsities": sparsities, "accuracy": accuracy}


def test_allocator_meets_target_and_spares_sensitive_layers():
    model = build_mobilenet_v2()
    sensitive = {"features.0.0.weight", "classifier.1.weight"}
    scan = _fake_scan(model, sensitive)
    sparsity = fg.allocate_sparsity(scan, model, target_size=0.25)
    fg.FineGrainedPruner(model, sparsity)
    assert fg.relative_size(model) <= 0.25
    assert fg.relative_size(model) > 0.24  # no needless over-pruning
    # Same predicted drop per step everywhere else: the cheapest weights to remove are in the
    # biggest layers, and the sensitive layers are left dense.
    assert all(sparsity[n] == 0.0 for n in sensitive)
    assert sparsity["features.18.0.weight"] == 0.9 and sparsity["features.17.conv.0.0.weight"] == 0.9
    with pytest.raises(MobilepruneError, match="scan higher sparsities"):
        fg.allocate_sparsity(scan, build_mobilenet_v2(), target_size=0.05)


def test_allocator_counts_the_weights_pruning_will_zero_not_fractions_of_them():
    # Seven layers of 3 weights: a 1 % step removes 0.03 of a weight on paper, and sparsity 0.12 of
    # 3 weights zeroes round(0.36) = 0 of them in fact (counted on paper, this model stayed at 0.905).
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(3, 1, bias=False) for _ in range(7)])
    sparsity = fg.allocate_sparsity(_fake_scan(model, set()), model, target_size=0.8)
    fg.FineGrainedPruner(model, sparsity)
    assert 0.75 < fg.relative_size(model) <= 0.8


def test_scan_shape_and_cache(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10))
    x = torch.randn(16, 3, 8, 8)
    reference = model(x).argmax(1)
    calls = []

    def agreement(m):
        calls.append(1)
        return (m(x).argmax(1) == reference).float().mean().item()

    scan = fg.sensitivity_scan(model, agreement, (0.5, 0.9), cache=tmp_path / "scan.json", progress=False)
    assert scan["dense"] == 1.0 and scan["sparsities"] == [0.5, 0.9]
    assert set(scan["accuracy"]) == {"0.weight", "2.weight"}
    assert all(len(v) == 2 for v in scan["accuracy"].values())
    assert torch.equal(model(x).argmax(1), reference)  # the scan left the weights as they were
    n = len(calls)
    assert fg.sensitivity_scan(model, agreement, (0.5, 0.9), cache=tmp_path / "scan.json") == scan
    assert len(calls) == n  # read from the cache


def test_scan_resumes_after_interruption_and_rescans_other_weights(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 4, 10))
    x = torch.randn(16, 3, 8, 8)
    reference = model(x).argmax(1)
    cache = tmp_path / "scan.json"
    calls, kill_at = [], [4]

    def agreement(m):
        calls.append(1)
        if len(calls) == kill_at[0]:  # dense + the first layer's two sparsities, then the run is "killed"
            raise RuntimeError("killed")
        return (m(x).argmax(1) == reference).float().mean().item()

    with pytest.raises(RuntimeError, match="killed"):
        fg.sensitivity_scan(model, agreement, (0.5, 0.9), cache=cache, progress=False)
    partial = json.loads(cache.read_text())
    assert list(partial["accuracy"]) == ["0.weight"]
    assert torch.equal(model(x).argmax(1), reference)  # the interrupted layer was put back

    calls.clear()
    kill_at[0] = None
    scan = fg.sensitivity_scan(model, agreement, (0.5, 0.9), cache=cache, progress=False)
    assert len(calls) == 4  # only the two layers left, two sparsities each: no dense pass, no layer 0
    assert set(scan["accuracy"]) == {"0.weight", "1.weight", "3.weight"}
    assert scan["accuracy"]["0.weight"] == partial["accuracy"]["0.weight"]

    # Other weights (another baseline) or another evaluation key: the cache is not trusted.
    calls.clear()
    fg.sensitivity_scan(model, agreement, (0.5, 0.9), cache=cache, progress=False, key={"scan_images": 8})
    assert len(calls) == 1 + 3 * 2
    with torch.no_grad():
        model[0].weight.mul_(2)
    calls.clear()
    fg.sensitivity_scan(model, agreement, (0.5, 0.9), cache=cache, progress=False, key={"scan_images": 8})
    assert len(calls) == 1 + 3 * 2


def test_sensitivity_ranking_orders_layers_by_accuracy_lost():
    scan = {"dense": 0.9, "sparsities": [0.5, 0.9],
            "accuracy": {"a.weight": [0.9, 0.8], "b.weight": [0.85, 0.3], "c.weight": [0.9, 0.85]}}
    ranking = fg.sensitivity_ranking(scan, 0.9)
    assert [name for name, _ in ranking] == ["b.weight", "a.weight", "c.weight"]
    assert ranking[0][1] == pytest.approx(0.6)
    with pytest.raises(MobilepruneError, match="was not scanned"):
        fg.sensitivity_ranking(scan, 0.7)


def test_adaptive_batchnorm_scan_point_sees_fresh_statistics_and_restores_the_models():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    model[1].running_mean.fill_(5.0)  # the dense model's statistics, stale once a layer is pruned
    stale = {name: buffer.clone() for name, buffer in model.named_buffers()}
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    seen = []
    evaluate = fg.with_adaptive_batchnorm(lambda m: seen.append(m[1].running_mean.clone()) or 0.5, images, size=32)
    assert evaluate(model) == 0.5
    with torch.no_grad():
        fresh = model[0](preprocess(images, 32)).mean((0, 2, 3))
    assert torch.allclose(seen[0], fresh, atol=1e-5)  # evaluated on statistics of these images
    assert all(torch.equal(buffer, stale[name]) for name, buffer in model.named_buffers())  # then put back
