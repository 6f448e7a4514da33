"""Tests of the datasets (App. G.1): digits, the binary CIFAR-10 reader, CIFAR-2, storage.

The real CIFAR-10 archive is never needed: the tests write small archives in the exact
official binary format and check the reader against bytes worked out by hand.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits as sk_load_digits

from diffusion_attribution.diffusion.datasets import (
    CIFAR10_CLASSES,
    CIFAR10_MD5,
    ImageDataset,
    cifar2_indices,
    image_grid,
    load_cifar,
    load_dataset,
    load_digits,
    read_cifar10_binary,
)

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
# binary CIFAR-10 archive, written here in the official format
# --------------------------------------------------------------------------------------

RECORD = 3073
TRAIN_NAMES = [f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)]
TEST_NAME = "cifar-10-batches-bin/test_batch.bin"


def pixel(batch: int, n: int, c: int, r: int, col: int) -> int:
    """The byte written for record n of batch ``batch`` at channel c, row r, column col."""
    return (31 * batch + 7 * n + 101 * c + 5 * r + 3 * col) % 256


def batch_bytes(batch: int, labels: list[int]) -> bytes:
    """One batch file, record by record: label byte, then 1024 R, 1024 G, 1024 B bytes."""
    out = bytearray()
    for n, label in enumerate(labels):
        out.append(label)
        for c in range(3):
            for r in range(32):
                for col in range(32):
                    out.append(pixel(batch, n, c, r, col))
    return bytes(out)


def batch_labels(batch: int, count: int = 3) -> list[int]:
    return [(batch + n) % 10 for n in range(count)]


def write_archive(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def official_members() -> dict[str, bytes]:
    """Batches 1..5 (batch number b = 1..5) and test (b = 6), plus the official extras."""
    members = {"cifar-10-batches-bin/batches.meta.txt": "\n".join(CIFAR10_CLASSES).encode()}
    # written out of order on purpose: the reader must order the train batches 1..5
    for b in (3, 1, 5, 2, 4):
        members[TRAIN_NAMES[b - 1]] = batch_bytes(b, batch_labels(b))
    members[TEST_NAME] = batch_bytes(6, batch_labels(6, count=2))
    members["cifar-10-batches-bin/readme.html"] = b"<html></html>"
    return members


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cifar") / "cifar-10-binary.tar.gz"
    return write_archive(path, official_members())


def test_record_layout_by_hand():
    data = batch_bytes(1, [4, 9])
    assert len(data) == 2 * RECORD
    # record 1 starts at byte 3073: its label, then red (0..1023), green, blue
    assert data[RECORD] == 9
    # green (c=1), row 2, column 3 of record 1: offset 3073 + 1 + 1024 + 64 + 3 = 4165;
    # value (31*1 + 7*1 + 101*1 + 5*2 + 3*3) % 256 = 158
    assert data[4165] == 158 == pixel(1, 1, 1, 2, 3)


def test_read_train_split_recovers_bytes(archive):
    images, labels = read_cifar10_binary(archive, "train")
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert images.shape == (15, 3, 32, 32) and labels.shape == (15,)
    # batches 1..5 concatenated in order, 3 records each
    expected_labels = [lab for b in range(1, 6) for lab in batch_labels(b)]
    assert labels.tolist() == expected_labels
    raw = {b: batch_bytes(b, batch_labels(b)) for b in range(1, 6)}
    for i in range(15):
        b, n = 1 + i // 3, i % 3
        for c, r, col in [(0, 0, 0), (1, 2, 3), (2, 31, 31), (0, 31, 0), (2, 0, 17)]:
            byte = raw[b][n * RECORD + 1 + c * 1024 + r * 32 + col]
            assert images[i, c, r, col].item() == byte == pixel(b, n, c, r, col)
    # every pixel, against the formula
    b = torch.arange(1, 6).repeat_interleave(3).view(-1, 1, 1, 1)
    n = torch.arange(3).repeat(5).view(-1, 1, 1, 1)
    c = torch.arange(3).view(1, -1, 1, 1)
    r = torch.arange(32).view(1, 1, -1, 1)
    col = torch.arange(32).view(1, 1, 1, -1)
    assert torch.equal(images.long(), (31 * b + 7 * n + 101 * c + 5 * r + 3 * col) % 256)


def test_read_is_channel_major_not_interleaved(tmp_path):
    # one record: red plane all 10, green all 20, blue all 30
    record = bytes([5]) + bytes([10]) * 1024 + bytes([20]) * 1024 + bytes([30]) * 1024
    members = {name: record for name in TRAIN_NAMES}
    path = write_archive(tmp_path / "a.tar.gz", members)
    images, labels = read_cifar10_binary(path)
    assert labels.tolist() == [5] * 5
    assert (images[:, 0] == 10).all() and (images[:, 1] == 20).all()
    assert (images[:, 2] == 30).all()


def test_read_test_split(archive):
    images, labels = read_cifar10_binary(archive, split="test")
    assert images.shape == (2, 3, 32, 32)
    assert labels.tolist() == batch_labels(6, count=2)
    assert images[1, 2, 5, 7].item() == pixel(6, 1, 2, 5, 7)


def test_test_split_needs_only_test_batch(tmp_path):
    path = write_archive(tmp_path / "a.tar.gz", {TEST_NAME: batch_bytes(6, [0])})
    images, labels = read_cifar10_binary(path, split="test")
    assert images.shape == (1, 3, 32, 32) and labels.tolist() == [0]
    with pytest.raises(ValueError, match="data_batch_1.bin"):
        read_cifar10_binary(path, split="train")


def test_read_errors(tmp_path):
    members = official_members()
    # missing member
    missing = dict(members)
    del missing[TRAIN_NAMES[2]]
    path = write_archive(tmp_path / "missing.tar.gz", missing)
    with pytest.raises(ValueError, match="missing member.*data_batch_3.bin"):
        read_cifar10_binary(path)
    # truncated record
    truncated = dict(members)
    truncated[TRAIN_NAMES[1]] = members[TRAIN_NAMES[1]][:-5]
    path = write_archive(tmp_path / "truncated.tar.gz", truncated)
    with pytest.raises(ValueError, match="data_batch_2.bin.*multiple of the 3073"):
        read_cifar10_binary(path)
    # label above 9
    bad = dict(members)
    bad[TEST_NAME] = batch_bytes(6, [3, 10])
    path = write_archive(tmp_path / "badlabel.tar.gz", bad)
    with pytest.raises(ValueError, match="record 1 has label 10"):
        read_cifar10_binary(path, split="test")
    # not an archive at all
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar file" * 100)
    with pytest.raises(ValueError, match="not a readable tar"):
        read_cifar10_binary(junk)
    # unknown split
    with pytest.raises(ValueError, match="unknown split"):
        read_cifar10_binary(path, split="val")


def test_md5_check(archive):
    good = hashlib.md5(archive.read_bytes()).hexdigest()
    images, _ = read_cifar10_binary(archive, "test", md5=good.upper())
    assert images.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="MD5 .* differs"):
        read_cifar10_binary(archive, "test", md5=CIFAR10_MD5)
    with pytest.raises(ValueError, match="MD5 .* differs"):
        load_cifar(archive, "cifar10", md5="0" * 32)
    with pytest.raises(ValueError, match="MD5 .* differs"):
        load_dataset("cifar2", cifar_archive=archive, cifar2_size=2, cifar_md5=CIFAR10_MD5)


def test_missing_archive_names_path_and_remedy(tmp_path):
    path = tmp_path / "nowhere" / "cifar-10-binary.tar.gz"
    with pytest.raises(FileNotFoundError) as info:
        read_cifar10_binary(path)
    message = str(info.value)
    assert str(path) in message
    assert "dvc update data.dvc" in message and "cifar-10-binary.tar.gz" in message
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset("cifar2", cifar_archive=path)


# --------------------------------------------------------------------------------------
# CIFAR-2 subsampling and loading
# --------------------------------------------------------------------------------------


def synthetic_labels() -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    return torch.randint(0, 10, (2000,), generator=gen)


def test_cifar2_indices_even_split_and_classes():
    labels = synthetic_labels()
    idx = cifar2_indices(labels, size=100, seed=0)
    assert idx.dtype == torch.int64 and idx.shape == (100,)
    assert torch.equal(idx, torch.sort(idx).values)
    assert len(set(idx.tolist())) == 100
    chosen = labels[idx]
    assert set(chosen.tolist()) == {1, 7}
    assert (chosen == 1).sum().item() == 50 and (chosen == 7).sum().item() == 50


def test_cifar2_indices_seeded():
    labels = synthetic_labels()
    a = cifar2_indices(labels, size=100, seed=0)
    assert torch.equal(a, cifar2_indices(labels, size=100, seed=0))
    assert not torch.equal(a, cifar2_indices(labels, size=100, seed=1))


def test_cifar2_indices_errors():
    labels = synthetic_labels()
    with pytest.raises(ValueError, match="odd"):
        cifar2_indices(labels, size=101)
    n7 = int((labels == 7).sum())
    with pytest.raises(ValueError, match="class 7 has only"):
        cifar2_indices(labels, size=2 * n7 + 2)
    with pytest.raises(ValueError, match="positive"):
        cifar2_indices(labels, size=0)


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
