"""amc.data on real data: sklearn digits, the Debian Fashion-MNIST files, idx/ImageFolder trees
written to tmp_path."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from amc.config import DataConfig
from amc.data import FASHION_MNIST_ROOT, DataSplits, InMemoryImages, load_splits, make_loader
from amc.errors import UserError


def digits_cfg(**kw) -> DataConfig:
    return DataConfig(**{"name": "digits", "input_size": 8, "reward_val_size": 200, **kw})


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_splits(digits_cfg(), seed=0)


def index_set(ds) -> set[int]:
    return set(ds.indices.tolist())


# --------------------------------------------------------------------------- digits


def test_digits_sizes_shapes_classes(digits: DataSplits) -> None:
    assert (digits.num_classes, digits.in_channels) == (10, 1)
    assert len(digits.test) == 360  # fixed stratified 20 % of 1,797
    assert len(digits.train) + len(digits.reward_val) == 1797 - 360
    assert len(digits.reward_val) == 200
    assert len(digits.train_eval) == len(digits.train)
    for ds in (digits.train, digits.train_eval, digits.reward_val, digits.test):
        image, label = ds[0]
        assert image.shape == (1, 8, 8) and image.dtype == torch.float32
        assert 0 <= int(label) < 10
    # every class is in the test split (stratified)
    assert set(digits.test[list(range(len(digits.test)))][1].tolist()) == set(range(10))


def test_digits_reward_val_disjoint_and_seeded(digits: DataSplits) -> None:
    train, reward, test = index_set(digits.train), index_set(digits.reward_val), index_set(digits.test)
    assert index_set(digits.train_eval) == train
    assert not train & reward and not train & test and not reward & test
    assert train | reward | test == set(range(1797))

    again = load_splits(digits_cfg(), seed=0)
    assert index_set(again.reward_val) == reward and index_set(again.test) == test
    other = load_splits(digits_cfg(), seed=1)
    assert index_set(other.reward_val) != reward
    assert index_set(other.test) == test  # the test split does not depend on the seed
    assert index_set(other.reward_val) | index_set(other.train) == train | reward


def test_reward_val_size_too_big() -> None:
    with pytest.raises(UserError, match=r"data\.reward_val_size: .*1437"):
        load_splits(digits_cfg(reward_val_size=1437), seed=0)


def test_mean_length_mismatch() -> None:
    with pytest.raises(UserError, match=r"data\.mean"):
        load_splits(digits_cfg(mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2]), seed=0)


def test_custom_mean_std_and_padding() -> None:
    splits = load_splits(digits_cfg(input_size=12, mean=[0.0], std=[1.0], augment=False), seed=0)
    image, _ = splits.test[0]
    assert image.shape == (1, 12, 12)
    assert image.min() >= 0 and image.max() <= 1  # only scaled to [0, 1]
    # centred zero padding: 2 pixels on every side
    inner = torch.zeros(12, 12, dtype=torch.bool)
    inner[2:10, 2:10] = True
    assert torch.all(image[0][~inner] == 0)
    assert splits.train is splits.train_eval  # augment: false


def test_augmentation_is_a_shift_of_the_eval_image(digits: DataSplits) -> None:
    """digits: shift by up to one pixel (pad 1 + random crop), never flipped."""
    torch.manual_seed(0)
    idx = list(range(32))
    aug, labels = digits.train[idx]
    plain, plain_labels = digits.train_eval[idx]
    assert torch.equal(labels, plain_labels) and aug.shape == plain.shape
    fill = digits.train.fill
    moved = 0
    for a, p in zip(aug, plain):
        padded = fill.expand(1, 10, 10).clone()
        padded[:, 1:9, 1:9] = p
        crops = [padded[:, y : y + 8, x : x + 8] for y in range(3) for x in range(3)]
        assert any(torch.equal(a, c) for c in crops)
        moved += not torch.equal(a, p)
    assert moved > 16  # 8 of 9 offsets move the image


def test_make_loader_order_is_seeded(digits: DataSplits) -> None:
    def labels(seed: int, ds=digits.train_eval) -> torch.Tensor:
        return torch.cat([y for _, y in make_loader(ds, 64, shuffle=True, seed=seed)])

    assert torch.equal(labels(3), labels(3))
    assert not torch.equal(labels(3), labels(4))
    loader = make_loader(digits.test, 100, shuffle=False, seed=0, drop_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    x, y = batches[0]
    assert x.shape == (100, 1, 8, 8) and y.dtype == torch.int64
    assert torch.equal(x, digits.test[list(range(100))][0])  # unshuffled = in order
    # a plain Dataset goes through the ordinary DataLoader path
    plain = torch.utils.data.TensorDataset(torch.arange(10.0), torch.arange(10))
    order = lambda s: torch.cat([y for _, y in make_loader(plain, 4, True, s)])  # noqa: E731
    assert torch.equal(order(5), order(5))


# --------------------------------------------------------------------------- idx files


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_mnist(root: Path, n_train: int = 30, n_test: int = 10, gz: bool = False) -> None:
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_idx_files(tmp_path: Path, gz: bool) -> None:
    write_mnist(tmp_path, gz=gz)
    cfg = DataConfig(name="mnist", root=str(tmp_path), input_size=32, reward_val_size=5)
    splits = load_splits(cfg, seed=0)
    assert (len(splits.train), len(splits.reward_val), len(splits.test)) == (25, 5, 10)
    assert splits.train[0][0].shape == (1, 32, 32)
    smaller = load_splits(cfg.model_copy(update={"input_size": 14}), seed=0)
    assert smaller.test[0][0].shape == (1, 14, 14)  # bigger images are resized down


def test_truncated_idx_file(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:1000])
    cfg = DataConfig(name="mnist", root=str(tmp_path), input_size=28, reward_val_size=5)
    with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte: truncated"):
        load_splits(cfg, seed=0)


def test_truncated_gzip_and_foreign_idx_file(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    cfg = DataConfig(name="fashion_mnist", root=str(tmp_path), input_size=28, reward_val_size=5)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:20])
    with pytest.raises(UserError, match=r"train-labels-idx1-ubyte\.gz: cannot read"):
        load_splits(cfg, seed=0)
    write_idx(labels, np.arange(30) % 10)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"<html>not found</html>"))
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte\.gz: not an idx file"):
        load_splits(cfg, seed=0)


def test_missing_idx_file_names_it(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    cfg = DataConfig(name="fashion_mnist", root=str(tmp_path), input_size=28, reward_val_size=5)
    with pytest.raises(UserError, match=r"train-labels-idx1-ubyte\.gz.*apt-get install dataset-fashion-mnist"):
        load_splits(cfg, seed=0)


def test_mnist_needs_a_root() -> None:
    with pytest.raises(UserError, match=r"data\.root: required for mnist"):
        load_splits(DataConfig(name="mnist", input_size=28, reward_val_size=5), seed=0)


# --------------------------------------------------------------------------- missing / empty roots


@pytest.mark.parametrize(
    "name, how",
    [
        ("fashion_mnist", "apt-get install dataset-fashion-mnist"),
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("imagefolder", "train/<class>"),
    ],
)
@pytest.mark.parametrize("state", ["missing", "empty"])
def test_missing_or_empty_root(tmp_path: Path, name: str, how: str, state: str) -> None:
    root = tmp_path / "data"
    if state == "empty":
        root.mkdir()
    cfg = DataConfig(name=name, root=str(root), input_size=32, reward_val_size=5)
    with pytest.raises(UserError) as info:
        load_splits(cfg, seed=0)
    message = str(info.value)
    assert message.startswith("data.root: ") and str(root) in message and how in message
    assert ("is empty" if state == "empty" else "is not a directory") in message


def test_corrupt_cifar_root(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"junk")
    cfg = DataConfig(name="cifar10", root=str(tmp_path), input_size=32, reward_val_size=5)
    with pytest.raises(UserError, match=r"data\.root: .*cifar-10-batches-py.*not found or corrupted"):
        load_splits(cfg, seed=0)


def test_imagefolder_without_val(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), input_size=32, reward_val_size=1)
    with pytest.raises(UserError, match=rf"{tmp_path / 'val'} does not exist"):
        load_splits(cfg, seed=0)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match=rf"data\.root: {tmp_path / 'train'}: Found no valid file"):
        load_splits(cfg, seed=0)


# --------------------------------------------------------------------------- ImageFolder


def write_imagefolder(root: Path, classes=("cat", "dog", "owl"), per_class: int = 4) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_imagefolder_loads(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), input_size=24, reward_val_size=3)
    splits = load_splits(cfg, seed=0)
    assert (splits.num_classes, splits.in_channels) == (3, 3)
    assert (len(splits.train), len(splits.reward_val), len(splits.test)) == (9, 3, 6)
    assert not index_set(splits.train) & index_set(splits.reward_val)
    for ds in (splits.train, splits.train_eval, splits.reward_val, splits.test):
        image, label = ds[0]
        assert image.shape == (3, 24, 24) and 0 <= label < 3
    x, y = next(iter(make_loader(splits.train, 4, shuffle=True, seed=0)))
    assert x.shape == (4, 3, 24, 24) and y.shape == (4,)


def test_imagefolder_class_mismatch(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    (tmp_path / "val" / "owl").rename(tmp_path / "val" / "emu")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), input_size=24, reward_val_size=3)
    with pytest.raises(UserError, match=r"same class folders.*owl.*emu"):
        load_splits(cfg, seed=0)


def test_batches_have_standard_nchw_strides(tmp_path: Path, digits: DataSplits) -> None:
    """Augmented 1-channel batches used to come out channels-last (which a 1-channel tensor
    passes off as contiguous): a model's conv outputs were then channels-last and ``.view`` failed."""
    (tmp_path / "idx").mkdir()
    write_mnist(tmp_path / "idx")
    write_imagefolder(tmp_path / "folder")
    fashion = load_splits(DataConfig(name="fashion_mnist", root=str(tmp_path / "idx"), input_size=28,
                                     reward_val_size=5), seed=0)  # shift and flip
    folder = load_splits(DataConfig(name="imagefolder", root=str(tmp_path / "folder"), input_size=24,
                                    reward_val_size=3), seed=0)
    for splits in (digits, fashion, folder):
        for ds in (splits.train, splits.train_eval, splits.test):
            x, _ = next(iter(make_loader(ds, 4, shuffle=True, seed=0)))
            assert x.stride() == torch.empty(x.shape).stride()
            assert nn.Conv2d(x.shape[1], 2, 3)(x).is_contiguous()


# --------------------------------------------------------------------------- Fashion-MNIST (real files)


@pytest.mark.skipif(
    not Path(FASHION_MNIST_ROOT).is_dir(),
    reason=f"{FASHION_MNIST_ROOT} absent (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_real_files() -> None:
    cfg = DataConfig(name="fashion_mnist", input_size=32, reward_val_size=5000)
    splits = load_splits(cfg, seed=0)
    assert (splits.num_classes, splits.in_channels) == (10, 1)
    assert (len(splits.train), len(splits.reward_val), len(splits.test)) == (55000, 5000, 10000)
    assert not index_set(splits.train) & index_set(splits.reward_val)
    assert isinstance(splits.test, InMemoryImages)
    image, label = splits.train[0]
    assert image.shape == (1, 32, 32) and 0 <= int(label) < 10
    x, y = next(iter(make_loader(splits.test, 512, shuffle=False, seed=0)))
    assert x.shape == (512, 1, 32, 32)
    assert torch.bincount(splits.test.labels, minlength=10).tolist() == [1000] * 10
    # 28 -> 32: two rows of padding (a black pixel, normalised) on each side
    black = (0 - 0.2860) / 0.3530
    assert torch.allclose(x[:, :, :2, :], torch.tensor(black)) and torch.allclose(x[:, :, :, -2:], torch.tensor(black))
    # the real images are roughly standardised by the default statistics
    inner = splits.test.images[:, :, 2:30, 2:30]
    assert abs(inner.mean().item()) < 0.05 and abs(inner.std().item() - 1) < 0.05
