"""Training sets (paper App. G.1): CIFAR-2, CIFAR-10, and their CPU-sized analogues.

The paper trains on CIFAR-10 (the 50,000-image train split) and on CIFAR-2, "a subset of
CIFAR-10 of 5000 randomly subsampled images of classes *car* and *horse*, preserving an even
class split" (following Zheng et al., 2024). This module provides both, read from the
official *binary* CIFAR-10 archive (``cifar-10-binary.tar.gz``, tracked by ``data.dvc``) with
numpy by :mod:`diffusion_attribution.diffusion.cifar`, never by unpickling anything, plus
scikit-learn's bundled 8x8 digits, which ship with scikit-learn and so work offline:
``digits2`` (two classes, by default the visually confusable 3 and 8) and ``digits10`` are the
CPU-sized stand-ins for CIFAR-2 and CIFAR-10.

Every dataset is an :class:`ImageDataset`: float32 images in ``[-1, 1]`` (the DDPM data range)
and the original integer class ids.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffusion_attribution.core.io import atomic_save
from diffusion_attribution.diffusion.cifar import (
    CIFAR10_CLASSES,
    cifar2_indices,
    read_cifar10_binary,
)

__all__ = [
    "DATASET_NAMES",
    "ImageDataset",
    "image_grid",
    "load_cifar",
    "load_dataset",
    "load_digits",
]

#: Names accepted by :func:`load_dataset`.
DATASET_NAMES: tuple[str, ...] = ("digits2", "digits10", "cifar2", "cifar10")
_FORMAT = "diffusion_attribution.ImageDataset/1"


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled image dataset, ready for DDPM training.

    Attributes:
        images: ``(N, C, H, W)`` float32 in ``[-1, 1]``.
        labels: ``(N,)`` int64, the *original* class ids (e.g. 3 and 8 for digits-2, 1 and 7
            for CIFAR-2), not re-numbered.
        name: dataset name, e.g. ``"digits2"`` or ``"cifar2"``.
        class_names: names of the dataset's classes in ascending label order, e.g.
            ``("automobile", "horse")`` for CIFAR-2. A :meth:`subset` keeps its parent's
            ``class_names`` even when it happens to miss a class.
    """

    images: Tensor
    labels: Tensor
    name: str
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.ndim != 4:
            raise ValueError("images must be a 4-D tensor (N, C, H, W)")
        if self.images.dtype != torch.float32:
            raise ValueError(f"images must be float32, got {self.images.dtype}")
        if not isinstance(self.labels, Tensor) or self.labels.ndim != 1:
            raise ValueError("labels must be a 1-D tensor (N,)")
        if self.labels.dtype != torch.int64:
            raise ValueError(f"labels must be int64, got {self.labels.dtype}")
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"images and labels differ in length: {len(self.images)} vs {len(self.labels)}"
            )
        # Accept any sequence of strings but store a tuple, so the dataclass stays immutable.
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Tensor | Sequence[int]) -> ImageDataset:
        """Return the examples at ``indices`` (in the given order) as a new dataset.

        Args:
            indices: 1-D integer tensor or sequence of non-negative indices into this dataset.

        Raises:
            IndexError: if an index is negative or ``>= len(self)``.
            ValueError: if ``indices`` is not a 1-D integer collection.
        """
        idx = torch.as_tensor(indices)
        if idx.numel() == 0:
            idx = idx.reshape(0).to(torch.int64)
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
        if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
            raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
        idx = idx.to(torch.int64)
        n = len(self)
        bad = (idx < 0) | (idx >= n)
        if bool(bad.any()):
            raise IndexError(
                f"subset index {int(idx[bad][0])} out of range for dataset {self.name!r} "
                f"with {n} examples (valid: 0..{n - 1})"
            )
        return ImageDataset(
            images=self.images.index_select(0, idx),
            labels=self.labels.index_select(0, idx),
            name=self.name,
            class_names=self.class_names,
        )

    def save(self, path: str | Path) -> None:
        """Write the dataset to ``path`` with :func:`torch.save`, atomically.

        The file holds only tensors, strings and a list, so ``torch.load(path,
        weights_only=True)`` reads it. It is written to a temporary file in the same
        directory and moved into place with :func:`os.replace`, so a crash never leaves a
        half-written file at ``path``.
        """
        payload = {
            "format": _FORMAT,
            # clone: a view would otherwise drag its whole underlying storage into the file
            "images": self.images.detach().cpu().contiguous().clone(),
            "labels": self.labels.detach().cpu().contiguous().clone(),
            "name": self.name,
            "class_names": list(self.class_names),
        }
        atomic_save(payload, path)

    @classmethod
    def load(cls, path: str | Path) -> ImageDataset:
        """Read a dataset written by :meth:`save` (with ``weights_only=True``)."""
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{path} is not an ImageDataset file (format {_FORMAT!r})")
        return cls(
            images=payload["images"],
            labels=payload["labels"],
            name=payload["name"],
            class_names=tuple(payload["class_names"]),
        )


# --------------------------------------------------------------------------------------
# digits (scikit-learn), the CPU-sized analogue
# --------------------------------------------------------------------------------------


def _validate_digit_classes(classes: Sequence[int]) -> tuple[int, ...]:
    if isinstance(classes, (str, bytes)):
        raise ValueError(f"classes must be a sequence of ints, got {classes!r}")
    out: list[int] = []
    for c in classes:
        if isinstance(c, bool):
            raise ValueError(f"classes must be ints in 0..9, got {c!r}")
        try:
            ci = operator.index(c)
        except TypeError:
            raise ValueError(f"classes must be ints in 0..9, got {c!r}") from None
        if not 0 <= ci <= 9:
            raise ValueError(f"digit class {ci} out of range: classes must be ints in 0..9")
        out.append(ci)
    if not out:
        raise ValueError("classes must name at least one digit class")
    if len(set(out)) != len(out):
        raise ValueError(f"classes contains duplicates: {tuple(out)}")
    return tuple(sorted(out))


def load_digits(classes: Sequence[int] | None = None) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits as a one-channel dataset in ``[-1, 1]``.

    The CPU-sized analogue of CIFAR-10 / CIFAR-2 (App. G.1). Pixel values are integers
    0..16 and are mapped linearly by ``x / 8 - 1`` (0 -> -1, 8 -> 0, 16 -> 1). Images keep
    scikit-learn's order.

    Args:
        classes: digit classes to keep (ints in 0..9, distinct, at least one). ``None`` keeps
            all ten (digits-10, 1797 images); e.g. ``(3, 8)`` gives digits-2 (357 images).

    Returns:
        An :class:`ImageDataset` named ``f"digits{len(classes)}"`` of shape ``(N, 1, 8, 8)``,
        with ``class_names`` the digits as strings, e.g. ``("3", "8")``.

    Raises:
        ValueError: if ``classes`` is empty, has duplicates, or holds anything but ints 0..9.
    """
    # scikit-learn takes about a second to import: only when digits are loaded
    from sklearn.datasets import load_digits as _sk_load_digits

    keep = tuple(range(10)) if classes is None else _validate_digit_classes(classes)
    bunch = _sk_load_digits()
    pixels = np.asarray(bunch.images)  # (1797, 8, 8) float64 holding integers 0..16
    target = np.asarray(bunch.target, dtype=np.int64)
    mask = np.isin(target, keep)
    images = torch.from_numpy(pixels[mask]).to(torch.float32).div_(8.0).sub_(1.0).unsqueeze(1)
    labels = torch.from_numpy(target[mask].copy())
    return ImageDataset(
        images=images.contiguous(),
        labels=labels,
        name=f"digits{len(keep)}",
        class_names=tuple(str(c) for c in keep),
    )


# --------------------------------------------------------------------------------------
# CIFAR-2 and CIFAR-10 (the archive's reader: diffusion_attribution.diffusion.cifar)
# --------------------------------------------------------------------------------------


def load_cifar(
    archive: str | Path,
    dataset: str,
    cifar2_size: int = 5000,
    seed: int = 0,
    *,
    md5: str | None = None,
) -> ImageDataset:
    """CIFAR-10 (train split) or CIFAR-2 (App. G.1) as float32 images in ``[-1, 1]``.

    Pixels are mapped by ``x / 127.5 - 1`` (0 -> -1, 255 -> 1).

    Args:
        archive: path to the official ``cifar-10-binary.tar.gz``.
        dataset: ``"cifar10"`` (all 50,000 train images) or ``"cifar2"`` (see
            :func:`~diffusion_attribution.diffusion.cifar.cifar2_indices`: automobile and
            horse, ``cifar2_size`` images, even split).
        cifar2_size: size of CIFAR-2 (5000 in the paper).
        seed: seed of the CIFAR-2 draw.
        md5: if given (e.g. :data:`~diffusion_attribution.diffusion.cifar.CIFAR10_MD5`), the
            archive's expected MD5, checked while reading (see
            :func:`~diffusion_attribution.diffusion.cifar.read_cifar10_binary`).
    """
    if dataset not in ("cifar2", "cifar10"):
        raise ValueError(f"unknown CIFAR dataset {dataset!r}; expected 'cifar2' or 'cifar10'")
    images_u8, labels = read_cifar10_binary(archive, split="train", md5=md5)
    if dataset == "cifar2":
        classes = (1, 7)  # automobile ("car" in the paper) and horse
        idx = cifar2_indices(labels, classes=classes, size=cifar2_size, seed=seed)
        images_u8, labels = images_u8[idx], labels[idx]
        class_names = tuple(CIFAR10_CLASSES[c] for c in classes)
    else:
        class_names = CIFAR10_CLASSES
    images = images_u8.to(torch.float32).div_(127.5).sub_(1.0)
    return ImageDataset(images=images, labels=labels, name=dataset, class_names=class_names)


def load_dataset(
    name: str,
    *,
    digits_classes: Sequence[int] = (3, 8),
    cifar_archive: str | Path = "data/cifar-10-binary.tar.gz",
    cifar2_size: int = 5000,
    seed: int = 0,
    cifar_md5: str | None = None,
) -> ImageDataset:
    """Load a training set by name: ``digits2``, ``digits10``, ``cifar2`` or ``cifar10``.

    Args:
        name: one of :data:`DATASET_NAMES`.
        digits_classes: the two classes of ``digits2`` (ignored otherwise).
        cifar_archive: the CIFAR-10 binary archive (relative paths are relative to the
            working directory); only ``cifar2``/``cifar10`` read it.
        cifar2_size: size of CIFAR-2.
        seed: seed of the CIFAR-2 draw (the other datasets are deterministic).
        cifar_md5: if given (e.g. :data:`~diffusion_attribution.diffusion.cifar.CIFAR10_MD5`
            for the real archive), the archive's expected MD5, checked while reading it.

    Raises:
        ValueError: for an unknown name, or ``digits2`` without exactly two classes.
    """
    if name == "digits2":
        keep = _validate_digit_classes(digits_classes)
        if len(keep) != 2:
            raise ValueError(f"digits2 needs exactly two digit classes, got {tuple(keep)}")
        return load_digits(keep)
    if name == "digits10":
        return load_digits(None)
    if name in ("cifar2", "cifar10"):
        return load_cifar(cifar_archive, name, cifar2_size=cifar2_size, seed=seed, md5=cifar_md5)
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")


def _classes_only(ds: ImageDataset, ids: Tensor) -> ImageDataset:
    """The examples ``ids`` of ``ds``, with the class names of the classes they hold."""
    part = ds.subset(ids)
    present = sorted(set(part.labels.tolist()))
    names = {
        label: name for label, name in zip(ds.labels.unique().tolist(), ds.class_names, strict=True)
    }
    return ImageDataset(part.images, part.labels, ds.name, tuple(names[c] for c in present))


def finetune_split(
    ds: ImageDataset,
    base_classes: Sequence[int],
    classes: Sequence[int],
    size: int,
    seed: int,
) -> tuple[ImageDataset, ImageDataset]:
    """The base model's training set (every example of ``base_classes``) and the fine-tuning
    set (``size / len(classes)`` examples of each of ``classes``, drawn without replacement
    with ``seed``), both in ``ds``'s order (LoRA fine-tuning,
    :mod:`~diffusion_attribution.diffusion.lora`)."""
    if size % len(classes):
        raise ValueError(f"finetune_split: size {size} is not a multiple of {len(classes)} classes")
    g = torch.Generator().manual_seed(int(seed))
    picked = []
    for c in classes:
        ids = torch.nonzero(ds.labels == c).flatten()
        if len(ids) < size // len(classes):
            raise ValueError(
                f"finetune_split: class {c} has {len(ids)} examples, need {size // len(classes)}"
            )
        picked.append(ids[torch.randperm(len(ids), generator=g)[: size // len(classes)]])
    base = torch.nonzero(torch.isin(ds.labels, torch.tensor(list(base_classes)))).flatten()
    return _classes_only(ds, base), _classes_only(ds, torch.cat(picked).sort().values)


# --------------------------------------------------------------------------------------
# plotting
# --------------------------------------------------------------------------------------


def pixel_levels(name: str) -> int:
    """Number of equally spaced pixel values of a dataset in [-1, 1] (the ELBO's decoder bins).

    Digits take the 17 values 0..16, CIFAR the 256 values of a byte.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASET_NAMES)}")
    return 17 if name.startswith("digits") else 256


def image_grid(images: Tensor, nrow: int, pad_value: float = 1.0) -> np.ndarray:
    """Tile images in ``[-1, 1]`` into one array in ``[0, 1]`` for ``plt.imshow``.

    Images are laid out row by row, ``nrow`` per grid row (the last row may be short),
    separated and framed by 1-pixel padding of ``pad_value`` (white by default).

    Args:
        images: ``(N, C, H, W)`` with ``C`` 1 or 3, values in ``[-1, 1]`` (clipped).
        nrow: images per grid row (at least 1).
        pad_value: value of the padding, in ``[0, 1]``.

    Returns:
        float32 array of shape ``(R*(H+1)+1, K*(W+1)+1)`` for one channel, or
        ``(R*(H+1)+1, K*(W+1)+1, 3)`` for three, where ``K = min(nrow, N)`` and
        ``R = ceil(N / nrow)``.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must be (N, C, H, W) with C 1 or 3, got shape {tuple(images.shape)}"
        )
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    nrow = operator.index(nrow)
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    x = ((images.detach().cpu().to(torch.float32) + 1.0) / 2.0).clamp_(0.0, 1.0).numpy()
    cols = min(nrow, n)
    rows = -(-n // nrow)
    grid = np.full((c, rows * (h + 1) + 1, cols * (w + 1) + 1), pad_value, dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = 1 + r * (h + 1), 1 + k * (w + 1)
        grid[:, top : top + h, left : left + w] = x[i]
    return grid[0] if c == 1 else np.ascontiguousarray(grid.transpose(1, 2, 0))
