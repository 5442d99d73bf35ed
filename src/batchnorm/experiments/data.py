"""The data the claims are measured on: scikit-learn's digits (default) or MNIST IDX files.

Both become one :class:`Dataset` of images ``(N, 1, H, W)`` in ``[0, 1]`` and integer labels, split
into train and test once, with a fixed permutation, so every experiment sees the same split.

``--data`` takes ``digits`` or ``mnist:PATH`` where ``PATH`` is a folder holding the four MNIST
files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each optionally ``.gz``). IDX files are validated (magic number, element
type, rank, declared sizes against the file's length, matching counts, labels in 0..9) and a bad
one is a :class:`ValueError` that names the file and what is wrong.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Dataset", "load", "load_digits", "load_mnist", "read_idx"]

# MNIST's test set is 10,000 images; evaluating on all of them at every checkpoint would dominate
# the run time on a 2-core CPU, so experiments evaluate on a fixed subset of this size.
MAX_TEST = 2000


@dataclass(frozen=True)
class Dataset:
    """Images ``(N, 1, H, W)`` float32 in [0, 1], labels ``(N,)`` int64."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int = 10

    @property
    def side(self) -> int:
        return int(self.x_train.shape[-1])

    @property
    def features(self) -> int:
        return int(self.x_train[0].numel())

    def train_subset(self, n: int, seed: int = 0) -> Dataset:
        """The first ``n`` training examples of a fixed permutation (test set unchanged)."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.y_train), generator=g)[:n]
        return Dataset(f"{self.name}[train {n}]", self.x_train[idx], self.y_train[idx],
                       self.x_test, self.y_test, self.num_classes)

    def describe(self) -> str:
        return (f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test images of "
                f"{self.side}x{self.side}")


def _split(name: str, x: np.ndarray, y: np.ndarray, test: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    x_t = torch.from_numpy(np.ascontiguousarray(x[order], dtype=np.float32)).unsqueeze(1)
    y_t = torch.from_numpy(np.ascontiguousarray(y[order], dtype=np.int64))
    return Dataset(name, x_t[test:], y_t[test:], x_t[:test], y_t[:test])


def load_digits() -> Dataset:
    """scikit-learn's 1,797 8x8 digits, pixels scaled from 0..16 to [0, 1]; 500 held out."""
    from sklearn.datasets import load_digits as sk_load

    bunch = sk_load()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    return _split("digits", images, np.asarray(bunch.target), test=500)


_IDX_TYPES: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4",
                             0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into an array, validating its header."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:  # includes gzip.BadGzipFile
        raise ValueError(f"--data: cannot read IDX file {path!r}: {exc}") from exc
    if len(raw) < 4:
        raise ValueError(f"--data: {path!r} is not an IDX file: {len(raw)} bytes, header needs 4")
    zero, code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or code not in _IDX_TYPES or ndim == 0:
        raise ValueError(f"--data: {path!r} is not an IDX file: bad magic number "
                         f"0x{raw[:4].hex()} (expected 0x0000TTDD, TT an IDX type code)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"--data: {path!r}: truncated header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"--data: {path!r}: header declares shape {tuple(dims)} "
                         f"({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find(folder: str, stem: str) -> str:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                 stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise ValueError(f"--data: {folder!r} has no {stem} (or {stem}.gz)")


def _images_labels(folder: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    img_path = _find(folder, f"{prefix}-images-idx3-ubyte")
    lab_path = _find(folder, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8 or images.shape[1] != images.shape[2]:
        raise ValueError(f"--data: {img_path!r}: expected uint8 images of shape (N, H, H), "
                         f"got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"--data: {lab_path!r}: expected uint8 labels of shape (N,), "
                         f"got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"--data: {len(images)} images in {img_path!r} but {len(labels)} "
                         f"labels in {lab_path!r}")
    if len(labels) == 0:
        raise ValueError(f"--data: {lab_path!r} holds no examples")
    if labels.max() > 9:
        raise ValueError(f"--data: {lab_path!r}: labels must be 0..9, found {int(labels.max())}")
    return images.astype(np.float32) / 255.0, labels.astype(np.int64)


def load_mnist(folder: str) -> Dataset:
    """MNIST-format IDX files in ``folder``; the test set is capped at :data:`MAX_TEST` images."""
    if not os.path.isdir(folder):
        raise ValueError(f"--data: mnist:PATH expects a folder of IDX files, got {folder!r}")
    x_tr, y_tr = _images_labels(folder, "train")
    x_te, y_te = _images_labels(folder, "t10k")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise ValueError(f"--data: train images are {x_tr.shape[1:]} but test images are "
                         f"{x_te.shape[1:]}")
    keep = min(len(y_te), MAX_TEST)
    return Dataset(f"mnist ({folder})", torch.from_numpy(x_tr).unsqueeze(1),
                   torch.from_numpy(y_tr), torch.from_numpy(x_te[:keep].copy()).unsqueeze(1),
                   torch.from_numpy(y_te[:keep].copy()))


def load(spec: str | None) -> Dataset:
    """``None``/``"digits"`` → :func:`load_digits`; ``"mnist:PATH"`` → :func:`load_mnist`."""
    if spec is None or spec == "digits":
        return load_digits()
    if isinstance(spec, str) and spec.startswith("mnist:") and len(spec) > len("mnist:"):
        return load_mnist(os.path.expanduser(spec[len("mnist:"):]))
    raise ValueError(f"--data: expected 'digits' or 'mnist:PATH', got {spec!r}")
