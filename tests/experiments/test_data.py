from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

from batchnorm.experiments.data import load, load_mnist, read_idx


def _write_idx(path: str, arr: np.ndarray, *, code: int = 0x08, compress: bool = False,
               extra: bytes = b"", dims: tuple[int, ...] | None = None) -> None:
    dims = arr.shape if dims is None else dims
    raw = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    raw += arr.astype(np.uint8).tobytes() + extra
    opener = gzip.open if compress else open
    with opener(path, "wb") as fh:
        fh.write(raw)


def _mnist(folder: str, n_train: int = 12, n_test: int = 7, side: int = 6,
           compress: bool = False) -> None:
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte{suffix}"),
                   rng.integers(0, 256, (n, side, side)), compress=compress)
        _write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{suffix}"),
                   rng.integers(0, 10, n), compress=compress)


def test_digits_split_and_range(digits):
    assert digits.x_train.shape == (1297, 1, 8, 8) and digits.x_test.shape == (500, 1, 8, 8)
    assert float(digits.x_train.min()) >= 0 and float(digits.x_train.max()) <= 1
    assert set(digits.y_train.tolist()) == set(range(10))
    assert digits.features == 64 and digits.side == 8


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_idx(tmp_path, compress):
    _mnist(str(tmp_path), compress=compress)
    ds = load(f"mnist:{tmp_path}")
    assert ds.x_train.shape == (12, 1, 6, 6) and ds.x_test.shape == (7, 1, 6, 6)
    raw = read_idx(str(tmp_path / ("train-images-idx3-ubyte" + (".gz" if compress else ""))))
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), raw / 255.0, rtol=1e-6)


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic number"):
        read_idx(str(path))


def test_idx_size_mismatch(tmp_path):
    path = str(tmp_path / "x")
    _write_idx(path, np.zeros((3, 4, 4)), extra=b"\x00")
    with pytest.raises(ValueError, match=r"declares shape \(3, 4, 4\)"):
        read_idx(path)


def test_idx_truncated_header(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(ValueError, match="truncated header"):
        read_idx(str(path))


def test_mnist_count_mismatch(tmp_path):
    _mnist(str(tmp_path))
    _write_idx(str(tmp_path / "train-labels-idx1-ubyte"), np.zeros(5))
    with pytest.raises(ValueError, match="12 images .* but 5 labels"):
        load_mnist(str(tmp_path))


def test_mnist_bad_labels_and_missing(tmp_path):
    _mnist(str(tmp_path))
    _write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), np.full(7, 11))
    with pytest.raises(ValueError, match="labels must be 0..9"):
        load_mnist(str(tmp_path))
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(ValueError, match="has no t10k-labels-idx1-ubyte"):
        load_mnist(str(tmp_path))


def test_bad_gzip_and_spec(tmp_path):
    _mnist(str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read IDX file"):
        load_mnist(str(tmp_path))
    with pytest.raises(ValueError, match="expected 'digits' or 'mnist:PATH'"):
        load("cifar")
    with pytest.raises(ValueError, match="expects a folder"):
        load(f"mnist:{tmp_path}/nope")
