import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mobileprune import data
from mobileprune.cli import main
from mobileprune.errors import MobilepruneError
from mobileprune.models import build_mobilenet_v2, save_pickled_model

from conftest import make_cifar_dir, real_data_or_skip, write_cifar_bin


def test_reads_binary_records_exactly(tmp_path):
    images, labels = write_cifar_bin(tmp_path / "b.bin", 7)
    got_images, got_labels = data.read_cifar_bin(tmp_path / "b.bin")
    assert got_images.dtype == torch.uint8 and got_images.shape == (7, 3, 32, 32)
    assert np.array_equal(got_images.numpy(), images)
    assert got_labels.tolist() == labels.tolist()


def test_reads_python_pickle_format(tmp_path):
    images, labels = write_cifar_bin(tmp_path / "b.bin", 5)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": images.reshape(5, -1), b"labels": labels.tolist()}, f)
    got_images, got_labels = data.read_cifar_pickle(tmp_path / "data_batch_1")
    assert np.array_equal(got_images.numpy(), images) and got_labels.tolist() == labels.tolist()


def test_pickle_with_foreign_class_is_refused(tmp_path):
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": MobilepruneError("x")}, f)
    with pytest.raises(MobilepruneError, match="refusing to unpickle"):
        data.read_cifar_pickle(tmp_path / "test_batch")


def test_truncated_file_is_a_one_line_error(tmp_path):
    write_cifar_bin(tmp_path / "b.bin", 3)
    raw = (tmp_path / "b.bin").read_bytes()
    (tmp_path / "b.bin").write_bytes(raw[:-100])
    with pytest.raises(MobilepruneError, match=r"b\.bin: size 9119 bytes is not a positive multiple of 3073"):
        data.read_cifar_bin(tmp_path / "b.bin")


def test_label_outside_range_is_named(tmp_path):
    write_cifar_bin(tmp_path / "b.bin", 3)
    raw = bytearray((tmp_path / "b.bin").read_bytes())
    raw[3073] = 12  # label of record 1
    (tmp_path / "b.bin").write_bytes(bytes(raw))
    with pytest.raises(MobilepruneError, match="label 12 of record 1 is outside 0-9"):
        data.read_cifar_bin(tmp_path / "b.bin")


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    # The model is checked first: a missing model is named even when the data is missing too.
    assert main(["evaluate", str(tmp_path / "x.pth"), "--data", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x.pth: no such file" in err
    save_pickled_model(build_mobilenet_v2(), tmp_path / "m.pth")
    assert main(["evaluate", str(tmp_path / "m.pth"), "--data", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere: data folder (from --data) does not exist" in err

    folder = make_cifar_dir(tmp_path)
    (folder / "test_batch.bin").write_bytes(b"\0" * 3000)
    assert main(["grade", str(tmp_path / "nope.zip"), "--data", str(folder)]) == 2
    assert "nope.zip: no such file or folder" in capsys.readouterr().err


def test_data_dir_from_env_and_search(tmp_path, monkeypatch):
    folder = make_cifar_dir(tmp_path)
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert data.find_data_dir() == folder
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "empty"))
    with pytest.raises(MobilepruneError, match=r"from \$MOBILEPRUNE_DATA"):
        data.find_data_dir()


def test_validation_split_is_held_out_and_fixed_by_seed(tmp_path):
    folder = make_cifar_dir(tmp_path, per_batch=20, test=10)
    a = data.load_cifar10(folder, val_size=30, seed=1)
    b = data.load_cifar10(folder, val_size=30, seed=1)
    c = data.load_cifar10(folder, val_size=30, seed=2)
    assert len(a.val_labels) == 30 and len(a.train_labels) == 70 and len(a.test_labels) == 10
    assert torch.equal(a.val_images, b.val_images) and not torch.equal(a.val_images, c.val_images)
    train_rows = {bytes(x.numpy()) for x in a.train_images}
    assert not any(bytes(x.numpy()) in train_rows for x in a.val_images)


def test_train_window_takes_the_next_images_and_wraps(tmp_path):
    full = data.load_cifar10(make_cifar_dir(tmp_path, per_batch=4, test=2), val_size=6)  # 14 training images
    first, wrapped = data.train_window(full, 0, 5), data.train_window(full, 10, 6)
    assert torch.equal(first.train_images, full.train_images[:5])
    assert torch.equal(first.train_labels, full.train_labels[:5])
    assert torch.equal(wrapped.train_labels, torch.cat([full.train_labels[10:], full.train_labels[:2]]))
    assert torch.equal(wrapped.val_images, full.val_images) and torch.equal(wrapped.test_labels, full.test_labels)
    for count in (0, 15):
        with pytest.raises(MobilepruneError, match="does not fit a training split of 14"):
            data.train_window(full, 0, count)


def test_torchvision_resize_equals_interpolate():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    expected = (F.interpolate(x.float() / 255, size=224, mode="bilinear", align_corners=False) - mean) / std
    assert torch.allclose(data.preprocess(x, 224, "torchvision"), expected, atol=1e-4)


def test_preprocess_normalises_before_resizing_as_if_after():
    """Each resize matrix's rows sum to 1, so normalising the 32-px pixels first (what preprocess does,
    for speed) gives what normalising the resized image would."""
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1) * 255
    for variant in data.RESIZE_VARIANTS:
        for size in (112, 224):
            m = data.resize_matrix(variant, size)
            assert torch.allclose(m.sum(1), torch.ones(size))
            expected = (m @ x.float() @ m.T - mean) / std
            assert torch.allclose(data.preprocess(x, size, variant), expected, atol=1e-5)
    assert torch.allclose(data.preprocess(x, 32), (x.float() - mean) / std)


def test_runner_resize_uses_grid_without_half_pixel_offset():
    m = data.resize_matrix("runner")
    # dest 7 -> source 7*32/224 = 1.0 exactly: pixel 1 alone; dest 3 -> 0.428...: a blend of 0 and 1.
    assert m[7, 1] == 1 and m[7].sum() == 1
    assert torch.allclose(m[3, :2], torch.tensor([1 - 3 * 32 / 224, 3 * 32 / 224]))
    assert not torch.allclose(m, data.resize_matrix("torchvision"))
    with pytest.raises(MobilepruneError, match="unknown resize variant"):
        data.resize_matrix("nearest")


def test_augment_crops_and_flips_in_batch():
    x = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32).repeat(64, 3, 1, 1)
    out = data.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # Every output is some shift/flip of the input, and not all the same.
    assert len({tuple(o[0, 16, 8:24].tolist()) for o in out}) > 5
    flipped = data.augment(x, torch.Generator().manual_seed(0), pad=0)
    for o in flipped:
        assert torch.equal(o, x[0]) or torch.equal(o, x[0].flip(-1))


def test_real_test_batch():
    folder = real_data_or_skip()
    images, labels = data.read_cifar_bin(folder / "test_batch.bin")
    assert images.shape == (10000, 3, 32, 32)
    assert torch.bincount(labels, minlength=10).tolist() == [1000] * 10
