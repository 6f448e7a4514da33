"""Tests of the binary CIFAR-10 reader and the CIFAR-2 draw (App. G.1).

The real CIFAR-10 archive is never needed: the tests write small archives in the exact
official binary format and check the reader against bytes worked out by hand.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest
import torch

from diffusion_attribution.diffusion.cifar import (
    CIFAR10_CLASSES,
    CIFAR10_MD5,
    cifar2_indices,
    read_cifar10_binary,
)
from diffusion_attribution.diffusion.datasets import load_cifar, load_dataset

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
# CIFAR-2 subsampling
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
