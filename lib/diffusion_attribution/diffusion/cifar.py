"""The official binary CIFAR-10 archive (paper App. G.1), read with numpy, and the CIFAR-2 draw.

``cifar-10-binary.tar.gz`` (tracked by ``data.dvc``) is streamed member by member and its
records are parsed with numpy, never by unpickling anything. :func:`cifar2_indices` draws
CIFAR-2 from its labels. :func:`~diffusion_attribution.diffusion.datasets.load_cifar` turns
both into an :class:`~diffusion_attribution.diffusion.datasets.ImageDataset`.
"""

from __future__ import annotations

import hashlib
import operator
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "cifar2_indices",
    "read_cifar10_binary",
]

#: Class names of CIFAR-10, indexed by label (``batches.meta.txt`` of the official archive).
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

#: Where ``data.dvc`` imports the archive from.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
#: MD5 of ``cifar-10-binary.tar.gz`` as published on the CIFAR-10 page (170,052,171 bytes).
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"

_CIFAR_DIR = "cifar-10-batches-bin"
_CIFAR_MEMBERS = {
    "train": tuple(f"{_CIFAR_DIR}/data_batch_{i}.bin" for i in range(1, 6)),
    "test": (f"{_CIFAR_DIR}/test_batch.bin",),
}
_CIFAR_SIDE = 32
_CIFAR_PIXELS = 3 * _CIFAR_SIDE * _CIFAR_SIDE  # 3072: 1024 red, 1024 green, 1024 blue
_CIFAR_RECORD = 1 + _CIFAR_PIXELS  # one label byte, then the pixels


def _missing_archive_message(path: Path) -> str:
    return (
        f"CIFAR-10 archive not found: {str(path)!r}. The CIFAR-2/CIFAR-10 profiles need the "
        f"official binary archive cifar-10-binary.tar.gz. Fetch it with `dvc update data.dvc` "
        f"(downloads {CIFAR10_URL} and records its hash), or `dvc pull data.dvc` from a DVC "
        f"remote that holds it, or download cifar-10-binary.tar.gz (the 'binary version') "
        f"from https://www.cs.toronto.edu/~kriz/cifar.html into data/."
    )


def _parse_cifar_batch(name: str, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Split one batch's bytes into ``(N, 3, 32, 32)`` uint8 images and ``(N,)`` labels."""
    if len(data) == 0 or len(data) % _CIFAR_RECORD != 0:
        raise ValueError(
            f"{name}: size {len(data)} bytes is not a positive multiple of the "
            f"{_CIFAR_RECORD}-byte record (1 label byte + {_CIFAR_PIXELS} pixel bytes); "
            f"the archive is truncated or not the binary CIFAR-10 version"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise ValueError(f"{name}: record {bad} has label {int(labels[bad])}, expected 0..9")
    # Channel-major: 1024 red bytes, then 1024 green, then 1024 blue, each row-major 32x32.
    images = records[:, 1:].reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE).copy()
    return images, labels


class _HashingReader:
    """A minimal read-only file object that feeds every byte read through MD5."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.md5 = hashlib.md5()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.md5.update(data)
        return data

    def drain(self) -> None:
        """Read (and hash) whatever is left of the file."""
        while self.read(1 << 20):
            pass


def read_cifar10_binary(
    archive: str | Path, split: str = "train", *, md5: str | None = None
) -> tuple[Tensor, Tensor]:
    """Read one split of the official binary CIFAR-10 archive (App. G.1's CIFAR-10).

    The archive ``cifar-10-binary.tar.gz`` holds ``cifar-10-batches-bin/data_batch_1.bin`` ..
    ``data_batch_5.bin`` (train, 10,000 records each) and ``test_batch.bin`` (test). A record
    is one label byte followed by 3072 pixel bytes: the 1024 red, then 1024 green, then 1024
    blue values of a row-major 32x32 image. The archive is streamed member by member and the
    bytes are parsed with numpy; nothing is unpickled and nothing is extracted to disk.

    Reading a gzip stream does not by itself detect every corruption (a flipped byte inside
    a member can come through as a wrong pixel), so pass ``md5=CIFAR10_MD5`` to check the
    whole file in the same pass (``data.dvc`` records the same hash).

    Args:
        archive: path to ``cifar-10-binary.tar.gz``.
        split: ``"train"`` (batches 1..5, concatenated in that order) or ``"test"``.
        md5: if given, the expected MD5 (hex) of the archive file; checked while streaming.

    Returns:
        ``(images, labels)``: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``.

    Raises:
        FileNotFoundError: if ``archive`` does not exist (the message says how to get it).
        ValueError: for an unknown split, a file that is not a tar archive, a missing or
            duplicated member, a member whose size is not a multiple of 3073 bytes, a label
            above 9, or an MD5 that differs from ``md5``.
    """
    if split not in _CIFAR_MEMBERS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(_CIFAR_MEMBERS)}")
    path = Path(archive)
    if not path.is_file():
        raise FileNotFoundError(_missing_archive_message(path))
    wanted = _CIFAR_MEMBERS[split]
    parsed: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        # "r|*": a forward-only stream; each wanted member is read, parsed and dropped in turn.
        with path.open("rb") as raw:
            reader = _HashingReader(raw)
            with tarfile.open(fileobj=reader, mode="r|*") as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    if name not in wanted:
                        continue
                    if name in parsed:
                        raise ValueError(f"{path}: member {name} occurs more than once")
                    if not member.isfile():
                        raise ValueError(f"{path}: member {name} is not a regular file")
                    f = tar.extractfile(member)
                    if f is None:  # pragma: no cover - isfile() above rules this out
                        raise ValueError(f"{path}: cannot read member {name}")
                    parsed[name] = _parse_cifar_batch(name, f.read())
                if md5 is not None:
                    reader.drain()
    except tarfile.TarError as e:
        raise ValueError(f"{path} is not a readable tar(.gz) archive: {e}") from e
    if md5 is not None and reader.md5.hexdigest() != md5.lower():
        raise ValueError(
            f"{path}: MD5 {reader.md5.hexdigest()} differs from the expected {md5.lower()}; "
            f"the archive is corrupt or not the official cifar-10-binary.tar.gz"
        )
    missing = [m for m in wanted if m not in parsed]
    if missing:
        raise ValueError(
            f"{path}: missing member(s) {missing}; expected the official binary archive "
            f"cifar-10-binary.tar.gz with {list(wanted)}"
        )
    images = np.concatenate([parsed[m][0] for m in wanted])
    labels = np.concatenate([parsed[m][1] for m in wanted])
    return torch.from_numpy(images), torch.from_numpy(labels)


def cifar2_indices(
    labels: Tensor | Sequence[int],
    classes: Sequence[int] = (1, 7),
    size: int = 5000,
    seed: int = 0,
) -> Tensor:
    """Indices of CIFAR-2: ``size`` images of two classes with an even class split.

    App. G.1: "we follow Zheng et al. (2024) and create a subset of CIFAR-10 of 5000 randomly
    subsampled images of classes *car* and *horse*, preserving an even class split". The
    defaults are CIFAR-10's automobile (1) and horse (7). For each class in turn,
    ``size // len(classes)`` of its images are drawn without replacement with a
    :class:`torch.Generator` seeded by ``seed``. This is a seeded re-draw, not Zheng et al.'s
    own list of indices.

    Args:
        labels: ``(N,)`` integer labels of the full training set.
        classes: the distinct classes to draw (two for CIFAR-2).
        size: total number of indices; must split evenly over ``classes``.
        seed: seed of the draw; the same seed and labels give the same indices.

    Returns:
        ``(size,)`` int64 indices into ``labels``, sorted ascending.

    Raises:
        ValueError: if ``size`` is not positive or does not split evenly (e.g. odd for two
            classes), ``classes`` is empty or has duplicates, or a class has fewer than
            ``size // len(classes)`` images.
    """
    labels_t = torch.as_tensor(labels)
    if labels_t.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels_t.shape)}")
    classes = tuple(operator.index(c) for c in classes)
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct and non-empty, got {classes}")
    size = operator.index(size)
    if size <= 0 or size % len(classes) != 0:
        raise ValueError(
            f"size={size} must be a positive multiple of the number of classes "
            f"({len(classes)}) for an even class split"
            + (" (it is odd)" if len(classes) == 2 and size % 2 else "")
        )
    per_class = size // len(classes)
    gen = torch.Generator().manual_seed(operator.index(seed))
    chosen = []
    for c in classes:
        idx = torch.nonzero(labels_t == c).flatten()
        if len(idx) < per_class:
            raise ValueError(
                f"class {c} has only {len(idx)} images, fewer than the {per_class} needed "
                f"for size={size}"
            )
        perm = torch.randperm(len(idx), generator=gen)[:per_class]
        chosen.append(idx[perm])
    return torch.sort(torch.cat(chosen)).values.to(torch.int64)
