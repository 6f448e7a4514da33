"""Tests of the datasets (App. G.1): digits, CIFAR-2 and CIFAR-10 loaded from a small
archive in the official binary format (its reader: ``test_cifar``), storage, image grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits as sk_load_digits

from diffusion_attribution.diffusion.cifar import CIFAR10_CLASSES, cifar2_indices
from diffusion_attribution.diffusion.datasets import (
    ImageDataset,
    image_grid,
    load_cifar,
    load_dataset,
    load_digits,
)
from tests.diffusion.test_cifar import TRAIN_NAMES, batch_bytes, pixel, write_archive

# --------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sk_digits():
    return sk_load_digits()


def test_digits10_shape_and_labels(sk_digits):
    ds = load_digits()
    assert ds.images.shape == (1797, 1, 8, 8)
    assert ds.images.dtype == torch.float32
    assert ds.labels.dtype == torch.int64
    assert ds.name == "digits10"
    assert ds.class_names == tuple("0123456789")
    assert torch.equal(ds.labels, torch.from_numpy(sk_digits.target.astype(np.int64)))
    # value range is exactly [-1, 1], both ends reached
    assert ds.images.min().item() == -1.0
    assert ds.images.max().item() == 1.0


def test_digits2_is_exactly_classes_3_and_8_in_sklearn_order(sk_digits):
    ds = load_digits((8, 3))  # order of the argument does not matter
    keep = np.flatnonzero((sk_digits.target == 3) | (sk_digits.target == 8))
    assert len(ds) == len(keep) == 183 + 174
    assert ds.images.shape == (357, 1, 8, 8)
    assert ds.name == "digits2"
    assert ds.class_names == ("3", "8")
    assert torch.equal(ds.labels, torch.from_numpy(sk_digits.target[keep].astype(np.int64)))
    # inverse of the mapping x / 8 - 1 recovers sklearn's pixels, image for image
    back = ((ds.images[:, 0].double() + 1) * 8).numpy()
    np.testing.assert_array_equal(back, sk_digits.images[keep])
    assert ds.images.min().item() == -1.0 and ds.images.max().item() == 1.0


def test_digits_pixel_mapping_by_hand(sk_digits):
    ds = load_digits()
    # sklearn's image 1 (a "1"), row 1 is [0, 0, 0, 11, 16, 9, 0, 0]
    assert sk_digits.images[1, 1].tolist() == [0, 0, 0, 11, 16, 9, 0, 0]
    assert ds.images[1, 0, 1, 4].item() == 1.0  # 16 -> 1
    assert ds.images[1, 0, 1, 0].item() == -1.0  # 0 -> -1
    assert ds.images[1, 0, 1, 3].item() == 11 / 8 - 1  # 11 -> 0.375
    # sklearn's image 0, row 2 is [0, 3, 15, 2, 0, 11, 8, 0]
    assert sk_digits.images[0, 2].tolist() == [0, 3, 15, 2, 0, 11, 8, 0]
    assert ds.images[0, 0, 2, 6].item() == 0.0  # 8 -> 0
    assert ds.images[0, 0, 2, 1].item() == -0.625  # 3 -> 3/8 - 1


@pytest.mark.parametrize(
    ("classes", "match"),
    [
        ((), "at least one"),
        ((3, 3), "duplicates"),
        ((3, 10), "out of range"),
        ((-1,), "out of range"),
        ((3, 8.0), "ints"),
        ((True, 3), "ints"),
        ("38", "sequence of ints"),
    ],
)
def test_digits_bad_classes(classes, match):
    with pytest.raises(ValueError, match=match):
        load_digits(classes)


def test_load_dataset_dispatch():
    assert load_dataset("digits2").class_names == ("3", "8")
    assert load_dataset("digits2", digits_classes=(0, 1)).class_names == ("0", "1")
    assert len(load_dataset("digits10")) == 1797
    with pytest.raises(ValueError, match="exactly two"):
        load_dataset("digits2", digits_classes=(0, 1, 2))
    with pytest.raises(ValueError, match="digits2, digits10, cifar2, cifar10"):
        load_dataset("mnist")


# --------------------------------------------------------------------------------------
# CIFAR-2 and CIFAR-10 loading
# --------------------------------------------------------------------------------------


def test_load_cifar2_and_cifar10(tmp_path):
    # labels 1 and 7 alternate across the train batches; scaling x / 127.5 - 1
    members = {name: batch_bytes(b, [1, 7, 1, 7, 3]) for b, name in enumerate(TRAIN_NAMES, start=1)}
    path = write_archive(tmp_path / "cifar-10-binary.tar.gz", members)
    c10 = load_dataset("cifar10", cifar_archive=path)
    assert c10.images.shape == (25, 3, 32, 32) and c10.images.dtype == torch.float32
    assert c10.name == "cifar10" and c10.class_names == CIFAR10_CLASSES
    # 151 / 127.5 - 1 in float32
    assert pixel(1, 0, 1, 2, 3) == 151
    assert c10.images[0, 1, 2, 3].item() == np.float32(151) / np.float32(127.5) - np.float32(1)
    assert c10.images[0, 1, 2, 3].item() == pytest.approx(23.5 / 127.5)
    assert c10.images.min() >= -1 and c10.images.max() <= 1
    c2 = load_dataset("cifar2", cifar_archive=path, cifar2_size=8, seed=3)
    assert c2.name == "cifar2" and c2.class_names == ("automobile", "horse")
    assert len(c2) == 8 and sorted(c2.labels.tolist()) == [1] * 4 + [7] * 4
    idx = cifar2_indices(c10.labels, size=8, seed=3)
    assert torch.equal(c2.images, c10.images[idx])
    assert torch.equal(c2.labels, c10.labels[idx])
    # 0 and 255 map to exactly -1 and 1
    extremes = bytes([1]) + bytes([0]) * 1024 + bytes([255]) * 2048
    path2 = write_archive(tmp_path / "b.tar.gz", {n: extremes for n in TRAIN_NAMES})
    ds = load_cifar(path2, "cifar10")
    assert ds.images[:, 0].unique().tolist() == [-1.0]
    assert ds.images[:, 1:].unique().tolist() == [1.0]
    with pytest.raises(ValueError, match="unknown CIFAR dataset"):
        load_cifar(path2, "cifar100")


# --------------------------------------------------------------------------------------
# ImageDataset
# --------------------------------------------------------------------------------------


def small_dataset() -> ImageDataset:
    images = torch.linspace(-1, 1, 6 * 3 * 4 * 4).reshape(6, 3, 4, 4)
    return ImageDataset(images, torch.tensor([1, 7, 7, 1, 1, 7]), "toy", ["automobile", "horse"])


def test_save_load_round_trip(tmp_path):
    ds = small_dataset().subset([5, 0, 2])
    path = tmp_path / "sub" / "dataset.pt"
    ds.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["dataset.pt"]  # no temp file left
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"format", "images", "labels", "name", "class_names"}
    # a subset's file holds only its own rows, not its parent's storage
    assert raw["images"].untyped_storage().nbytes() == 3 * 3 * 4 * 4 * 4
    back = ImageDataset.load(path)
    assert torch.equal(back.images, ds.images) and torch.equal(back.labels, ds.labels)
    assert back.name == "toy" and back.class_names == ("automobile", "horse")
    ds.subset([1]).save(path)  # overwriting is fine
    assert len(ImageDataset.load(path)) == 1
    torch.save({"images": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an ImageDataset"):
        ImageDataset.load(tmp_path / "other.pt")


def test_subset():
    ds = small_dataset()
    sub = ds.subset(torch.tensor([4, 1]))
    assert len(sub) == 2
    assert torch.equal(sub.images, ds.images[[4, 1]])
    assert sub.labels.tolist() == [1, 7]
    assert sub.class_names == ds.class_names and sub.name == ds.name
    assert len(ds.subset([])) == 0
    with pytest.raises(IndexError, match="index 6 out of range.*6 examples"):
        ds.subset([0, 6])
    with pytest.raises(IndexError, match="index -1 out of range"):
        ds.subset([-1])
    with pytest.raises(ValueError, match="integers"):
        ds.subset(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        ds.subset(torch.zeros(2, 2, dtype=torch.long))


def test_dataset_validation():
    with pytest.raises(ValueError, match="float32"):
        ImageDataset(torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.zeros(2).long(), "x", ())
    with pytest.raises(ValueError, match="differ in length"):
        ImageDataset(torch.zeros(2, 1, 2, 2), torch.zeros(3).long(), "x", ())
    with pytest.raises(ValueError, match="int64"):
        ImageDataset(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int32), "x", ())


# --------------------------------------------------------------------------------------
# image_grid
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "nrow", "expected"),
    [
        ((1, 1, 8, 8), 4, (10, 10)),
        ((6, 1, 8, 8), 4, (2 * 9 + 1, 4 * 9 + 1)),
        ((8, 1, 8, 8), 4, (19, 37)),
        ((3, 3, 32, 32), 1, (3 * 33 + 1, 34, 3)),
        ((5, 3, 32, 32), 8, (34, 5 * 33 + 1, 3)),
    ],
)
def test_image_grid_shape(shape, nrow, expected):
    grid = image_grid(torch.zeros(shape), nrow)
    assert grid.shape == expected and grid.dtype == np.float32


def test_image_grid_values():
    images = torch.stack([torch.full((1, 2, 2), -1.0), torch.full((1, 2, 2), 1.0)])
    grid = image_grid(images, nrow=2)
    expected = np.ones((4, 7), dtype=np.float32)
    expected[1:3, 1:3] = 0.0  # -1 -> 0; the second image (1 -> 1) matches the padding
    np.testing.assert_array_equal(grid, expected)
    rgb = image_grid(torch.tensor([0.0, 0.5, 2.0]).view(1, 3, 1, 1), nrow=1)
    np.testing.assert_allclose(rgb[1, 1], [0.5, 0.75, 1.0])  # clipped to [0, 1]
    with pytest.raises(ValueError, match="C 1 or 3"):
        image_grid(torch.zeros(1, 2, 4, 4), 1)
    with pytest.raises(ValueError, match="nrow"):
        image_grid(torch.zeros(1, 1, 4, 4), 0)
