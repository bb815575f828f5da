"""Datasets, splits and loaders.

``load_splits`` turns a ``DataConfig`` into four datasets:

* ``train``      - the training split minus the reward-val images, with augmentation;
* ``train_eval`` - the same images without augmentation (BN calibration, reconstruction samples);
* ``reward_val`` - images held out of the *training* split that score pruning policies during
  the search, so the test split is never looked at while searching;
* ``test``       - the official test split (digits: a fixed stratified 20 % split).

The small grayscale datasets (digits, MNIST, Fashion-MNIST) live in memory as one tensor per
split with the eval transform (pad/resize + normalise) applied once up front. Evaluation batches
are then plain tensor gathers; training augmentation is a per-sample shift/flip on tensors.
CIFAR and ImageFolder go through torchvision datasets and PIL transforms.

Any other data comes from the user as Datasets: from a ``package.module:factory`` named by
``data.name`` (``factory(**data.kwargs)`` returns ``(train, test, num_classes, in_channels)``),
or handed to ``amc.compress``. ``dataset_splits`` holds reward-val and select out of their train
set with the same seeded permutation as the built-in sets; their samples are used as given
(``train`` and ``train_eval`` are the same images).
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, Subset

from amc.config import OBJECT_PREFIX, DataConfig
from amc.errors import UserError
from amc.imports import import_object

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package installs the idx files."""


@dataclass(frozen=True)
class _Spec:
    channels: int
    classes: int | None  # None: one per class folder (imagefolder)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_shift: int  # training augmentation: random shift by up to this many pixels (pad + crop)
    flip: bool  # training augmentation: random horizontal flip


_SPECS: dict[str, _Spec] = {
    # digits: statistics over all 1,797 images scaled to [0, 1]
    "digits": _Spec(1, 10, (0.3053,), (0.3760,), max_shift=1, flip=False),
    # no flips for handwritten digits: a mirrored 2 or 7 is not a 2 or 7
    "mnist": _Spec(1, 10, (0.1307,), (0.3081,), max_shift=4, flip=False),
    "fashion_mnist": _Spec(1, 10, (0.2860,), (0.3530,), max_shift=4, flip=True),
    "cifar10": _Spec(3, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), max_shift=4, flip=True),
    "cifar100": _Spec(3, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), max_shift=4, flip=True),
    # ImageNet statistics; augmentation is RandomResizedCrop + flip, max_shift unused
    "imagefolder": _Spec(3, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), max_shift=0, flip=True),
}


@dataclass
class DataSplits:
    train: Dataset  # training split minus reward_val, augmented (when data.augment)
    train_eval: Dataset  # same images as train, eval transform
    reward_val: Dataset  # held out of the training split, eval transform: scores policies
    select: Dataset  # held out too, disjoint from reward_val: picks the run's answer among candidates
    test: Dataset | None  # eval transform; None when amc.compress was given no test data
    num_classes: int | None  # None: data given to amc.compress that does not say (only recorded)
    in_channels: int


@dataclass(frozen=True)
class ImagePreprocessing:
    """The preprocessing pretrained weights were trained with (``amc.models.pretrained.preprocessing``)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_ratio: float  # resize side / crop side (torchvision: 256 / 224)
    interpolation: str  # a torchvision InterpolationMode value: "bilinear", "bicubic", ...


# --------------------------------------------------------------------------- datasets


class InMemoryImages(Dataset):
    """A view (``indices``) into one preprocessed image tensor.

    ``images`` already holds the eval transform's output, shape (N, C, H, W), float32, shared by
    every view of the same split. ``dataset[i]`` gives ``(image, label)``; ``dataset[list_of_i]``
    gives a whole batch ``(images, labels)`` in one gather, which ``make_loader`` uses so that a
    batch costs one indexing operation instead of ``batch_size`` calls and a stack.

    With ``max_shift``/``flip`` set, each sample is randomly shifted by up to ``max_shift``
    pixels (the same as zero-padding by ``max_shift`` then random-cropping back; the uncovered
    border gets ``fill``, the normalised value of a black pixel) and flipped with probability 1/2.
    The randomness comes from torch's global RNG (per worker: seeded by the DataLoader).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        indices: Tensor,
        *,
        max_shift: int = 0,
        flip: bool = False,
        fill: Tensor | None = None,
    ):
        self.images = images
        self.labels = labels
        self.indices = indices  # int64 positions in ``images``
        self.max_shift = max_shift
        self.flip = flip
        self.fill = fill if fill is not None else torch.zeros(images.shape[1], 1, 1)

    @property
    def augmented(self) -> bool:
        return self.max_shift > 0 or self.flip

    def with_augmentation(self, max_shift: int, flip: bool) -> "InMemoryImages":
        """Another view of the same images and indices, with the given augmentation."""
        return InMemoryImages(
            self.images, self.labels, self.indices, max_shift=max_shift, flip=flip, fill=self.fill
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: Any) -> tuple[Tensor, Tensor]:
        if isinstance(index, (int, np.integer)) or (isinstance(index, Tensor) and index.ndim == 0):
            images, labels = self[[int(index)]]
            return images[0], labels[0]
        if isinstance(index, slice):
            pos = self.indices[index]
        else:
            pos = self.indices[torch.as_tensor(index, dtype=torch.long)]
        images = self.images[pos]
        if self.augmented:
            images = self._augment(images)
        return images, self.labels[pos]

    def _augment(self, images: Tensor) -> Tensor:
        """Random shift (pad by ``max_shift`` + random crop) and flip, drawn per sample.

        Vectorised: pad the batch once, then one gather with per-sample row/column offsets;
        a flipped sample simply reads its columns in reverse. The gather runs over each flattened
        plane, so the result is a fresh NCHW tensor with standard strides: a model may ``.view``
        its activations. (Indexing (B, H, W, C) and permuting gives channels-last strides, which
        a 1-channel tensor passes off as contiguous; convolutions then return channels-last
        outputs and ``.view`` fails.)
        """
        b, c, h, w = images.shape
        s = self.max_shift
        if s > 0:
            padded = self.fill.to(images.dtype).expand(c, h + 2 * s, w + 2 * s).repeat(b, 1, 1, 1)
            padded[:, :, s : s + h, s : s + w] = images
        else:
            padded = images
        offsets = torch.randint(0, 2 * s + 1, (2, b))
        rows = offsets[0, :, None] + torch.arange(h)  # (B, H)
        cols = offsets[1, :, None] + torch.arange(w)  # (B, W)
        if self.flip:
            flipped = torch.rand(b) < 0.5
            cols = torch.where(flipped[:, None], cols.flip(1), cols)
        flat = (rows[:, :, None] * padded.shape[-1] + cols[:, None, :]).view(b, 1, h * w)
        return padded.reshape(b, c, -1).gather(2, flat.expand(b, c, h * w)).view(b, c, h, w)


class TransformedSubset(Dataset):
    """``indices`` of a torchvision dataset (whose own transform is None) through ``transform``.

    ``train`` and ``train_eval`` share one base dataset, so CIFAR is read into memory once.
    """

    def __init__(self, base: Dataset, indices: Tensor, transform: Callable[[Any], Tensor]):
        self.base = base
        self.indices = indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.base[int(self.indices[index])]
        return self.transform(image), label


# --------------------------------------------------------------------------- public API


def data_shape(cfg: DataConfig) -> tuple[int, int]:
    """(input channels, classes) of a built-in data set without loading the images: enough to build the model.

    An image folder has one class per folder under ``root/train``; 1000 (ImageNet) when the
    folder is not there yet. A data factory must be called (``load_splits``) to know its shape.
    """
    spec = _SPECS[cfg.name]
    if spec.classes is not None:
        return spec.channels, spec.classes
    train = Path(cfg.root or "") / "train"
    classes = sum(1 for p in train.iterdir() if p.is_dir()) if train.is_dir() else 0
    return spec.channels, classes or 1000


def load_splits(cfg: DataConfig, seed: int, preprocessing: ImagePreprocessing | None = None) -> DataSplits:
    """Load ``cfg.name`` and split it into train / train_eval / reward_val / test.

    The reward-val images are the first ``cfg.reward_val_size`` of a ``numpy.default_rng(seed)``
    permutation of the training split; the rest is ``train``. The test split is never touched.
    ``preprocessing`` (pretrained weights') replaces the image folder's resize, interpolation and
    default mean/std.
    """
    if cfg.name.startswith(OBJECT_PREFIX):
        raise UserError(f"{cfg.name} is data given to amc.compress(), which a name cannot load: call amc.compress "
                        "again (same run_dir)", field="data.name")
    if not cfg.builtin:
        return _factory_splits(cfg, seed)
    spec = _SPECS[cfg.name]
    if preprocessing is not None and cfg.name == "imagefolder" and cfg.mean is None:
        spec = _Spec(spec.channels, spec.classes, preprocessing.mean, preprocessing.std, spec.max_shift, spec.flip)
    mean, std = _mean_std(cfg, spec)
    if cfg.name in ("digits", "mnist", "fashion_mnist"):
        return _in_memory_splits(cfg, spec, mean, std, seed)
    if cfg.name in ("cifar10", "cifar100"):
        return _cifar_splits(cfg, spec, mean, std, seed)
    return _imagefolder_splits(cfg, spec, mean, std, seed, preprocessing)


def dataset_splits(train: Dataset, test: Dataset | None, num_classes: int | None, in_channels: int, cfg: DataConfig,
                   seed: int, held_out: tuple[Dataset, Dataset | None] | None = None) -> DataSplits:
    """A user's Datasets as DataSplits: reward-val and select held out of ``train`` by the seeded
    permutation (as for the built-in sets), or ``held_out`` = (reward_val, select) as given
    (select None: the run chooses on reward-val)."""
    for label, dataset in (("train", train), ("test", test), *zip(("reward_val", "select"), held_out or ())):
        if dataset is not None:
            _check_dataset(dataset, label)
    if held_out is None:
        train_pos, reward_pos, select_pos = _split_held_out(len(train), cfg, seed)
        reward_val, select = Subset(train, reward_pos.tolist()), Subset(train, select_pos.tolist())
        train = Subset(train, train_pos.tolist())
    else:
        reward_val, select = held_out[0], held_out[1] if held_out[1] is not None else Subset(held_out[0], [])
    return DataSplits(train=train, train_eval=train, reward_val=reward_val, select=select, test=test,
                      num_classes=num_classes, in_channels=in_channels)


def _check_dataset(dataset: Any, label: str) -> None:
    """A map-style Dataset of (input tensor, target) samples, else a one-line UserError."""
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise UserError(f"{label}: expected a map-style torch Dataset (with __len__ and __getitem__), "
                        f"got {type(dataset).__name__}", field="data")
    if len(dataset) == 0:
        raise UserError(f"{label}: the dataset is empty", field="data")
    sample = dataset[0]
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        shape = f"a {len(sample)}-tuple" if isinstance(sample, (tuple, list)) else f"a {type(sample).__name__}"
        raise UserError(f"{label}: a sample must be a pair (input tensor, target), got {shape}", field="data")
    if not isinstance(sample[0], Tensor):
        raise UserError(f"{label}: a sample's input must be a tensor, got {type(sample[0]).__name__}; give the "
                        "dataset a transform that returns tensors", field="data")


def _factory_splits(cfg: DataConfig, seed: int) -> DataSplits:
    """``data.name: package.module:factory``: ``factory(**data.kwargs)`` -> (train, test, num_classes, in_channels)."""
    label = f"data.name: {cfg.name}"
    result = import_object(cfg.name, label)(**cfg.kwargs)
    if not (isinstance(result, (tuple, list)) and len(result) == 4):
        raise UserError(f"{label}: the factory must return (train, test, num_classes, in_channels), "
                        f"got {type(result).__name__}")
    train, test, num_classes, in_channels = result
    if test is None:
        raise UserError(f"{label}: the factory returned no test set; return a Dataset (it is only measured)")
    for field, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{label}: the factory's {field} must be a positive int, got {value!r}")
    return dataset_splits(train, test, num_classes, in_channels, cfg, seed)


def split_signature(cfg: DataConfig, seed: int) -> dict[str, Any]:
    """What decides which training images are held out of training, as plain data.

    ``amc train`` stores it in the base checkpoint, and loading the base model compares it with
    the config's: a model trained on another split has seen some of the held-out images (with
    the demo's 300 reward-val images, changing ``seed`` from 0 to 1 puts 238 of them in the
    training split), so its rewards would be measured partly on training images. The split is
    a ``seed``-ed permutation of the dataset's training images; the dataset names the images,
    except for ``imagefolder`` whose folder is the dataset, so its absolute root is part of it
    (a named dataset may move without retraining). A new held-out split is one more key here;
    leave such a key out while its setting is off, so that older records stay valid.
    """
    signature: dict[str, Any] = {"dataset": cfg.name, "seed": seed, "reward_val_size": cfg.reward_val_size}
    if cfg.select_size:
        signature["select_size"] = cfg.select_size
    if cfg.kwargs:  # a data factory's arguments may change its images
        signature["kwargs"] = cfg.kwargs
    if cfg.name == "imagefolder":
        signature["root"] = None if cfg.root is None else str(Path(cfg.root).expanduser().resolve())
    return signature


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose order depends only on ``seed`` (a private ``torch.Generator``).

    Every batch is a pair ``[images, labels]``. For ``InMemoryImages`` the sampler yields whole
    lists of indices and the dataset gathers the batch at once (``loader.batch_size`` is then
    None; ``len(loader)`` is still the number of batches).
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    if isinstance(dataset, InMemoryImages):
        sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        return DataLoader(
            dataset,
            sampler=BatchSampler(sampler, batch_size, drop_last),
            batch_size=None,
            num_workers=num_workers,
            generator=generator,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
    )


# --------------------------------------------------------------------------- shared helpers


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors, and tensors inside tuples, lists and dicts (a detection target), moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def _mean_std(cfg: DataConfig, spec: _Spec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if cfg.mean is None or cfg.std is None:
        return spec.mean, spec.std
    if len(cfg.mean) != spec.channels:
        raise UserError(
            f"{cfg.name} images have {spec.channels} channel(s), so mean and std need "
            f"{spec.channels} entr{'y' if spec.channels == 1 else 'ies'}, got {len(cfg.mean)}",
            field="data.mean",
        )
    return tuple(cfg.mean), tuple(cfg.std)


def _split_held_out(n_train: int, cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, reward_val, select) positions in ``range(n_train)``: disjoint, each sorted.

    One seeded permutation: reward-val is its head, the selection split the next
    ``select_size`` positions, training the rest (so ``select_size: 0`` gives the same
    training images as before the selection split existed).
    """
    held = cfg.reward_val_size + cfg.select_size
    if held >= n_train:
        field = "data.select_size" if cfg.select_size and cfg.reward_val_size < n_train else "data.reward_val_size"
        raise UserError(
            f"{cfg.reward_val_size} reward-val + {cfg.select_size} selection images requested but the "
            f"{cfg.name} training split has only {n_train}; they must leave images for training",
            field=field,
        )
    if seed < 0:
        raise UserError(f"must be >= 0, got {seed}", field="seed")
    perm = np.random.default_rng(seed).permutation(n_train)
    r = cfg.reward_val_size
    return np.sort(perm[held:]), np.sort(perm[:r]), np.sort(perm[r:held])


def _root(cfg: DataConfig, default: str | None, hint: str) -> Path:
    """``data.root`` (or ``default``) as an existing, non-empty directory, else a UserError."""
    if cfg.root is None and default is None:
        raise UserError(f"required for {cfg.name}: {hint}", field="data.root")
    root = Path(cfg.root if cfg.root is not None else default).expanduser()
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; {hint}", field="data.root")
    if not any(root.iterdir()):
        raise UserError(f"{root} is empty; {hint}", field="data.root")
    return root


# --------------------------------------------------------------------------- digits / (fashion-)mnist


def _in_memory_splits(
    cfg: DataConfig, spec: _Spec, mean: tuple[float, ...], std: tuple[float, ...], seed: int
) -> DataSplits:
    if cfg.name == "digits":
        images, labels, train_pool, test_idx = _load_digits()
        store = _preprocess(images, 16.0, cfg.input_size, mean, std)
        train_store = test_store = store
        train_labels = test_labels = labels
    else:
        (train_images, train_labels), (test_images, test_labels) = _load_idx_dataset(cfg)
        train_store = _preprocess(train_images, 255.0, cfg.input_size, mean, std)
        test_store = _preprocess(test_images, 255.0, cfg.input_size, mean, std)
        train_pool = np.arange(len(train_images))
        test_idx = np.arange(len(test_images))

    train_pos, reward_pos, select_pos = _split_held_out(len(train_pool), cfg, seed)
    fill = ((0.0 - torch.tensor(mean)) / torch.tensor(std)).view(-1, 1, 1)
    as_idx = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))  # noqa: E731
    train_eval = InMemoryImages(train_store, train_labels, as_idx(train_pool[train_pos]), fill=fill)
    train = train_eval.with_augmentation(spec.max_shift, spec.flip) if cfg.augment else train_eval
    return DataSplits(
        train=train,
        train_eval=train_eval,
        reward_val=InMemoryImages(train_store, train_labels, as_idx(train_pool[reward_pos]), fill=fill),
        select=InMemoryImages(train_store, train_labels, as_idx(train_pool[select_pos]), fill=fill),
        test=InMemoryImages(test_store, test_labels, as_idx(test_idx), fill=fill),
        num_classes=10,
        in_channels=1,
    )


def _load_digits() -> tuple[np.ndarray, Tensor, np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits (values 0..16) and a fixed stratified 80/20 train/test split.

    Returns images (N, 8, 8), labels, and the train/test positions into them (sorted).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    labels = np.asarray(digits.target, dtype=np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels
    )
    return digits.images, torch.from_numpy(labels), np.sort(train_idx), np.sort(test_idx)


def _preprocess(
    images: np.ndarray, scale: float, size: int, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """(N, H, W) raw pixels -> (N, 1, size, size) float32: scaled to [0, 1], zero-padded (centred)
    up to ``size`` or resized down to it, then normalised. The eval transform, done once."""
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    n, c, h, w = x.shape
    if h > size or w > size:
        x = F.interpolate(x.float() / scale, size=(size, size), mode="bilinear", antialias=True)
    else:
        out = torch.zeros(n, c, size, size)
        top, left = (size - h) // 2, (size - w) // 2
        out[:, :, top : top + h, left : left + w] = x
        x = out.div_(scale)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_hint(name: str) -> str:
    files = ", ".join(f"{f}(.gz)" for pair in _IDX_FILES.values() for f in pair)
    if name == "fashion_mnist":
        return (
            f"install Fashion-MNIST with `apt-get install dataset-fashion-mnist` (goes to "
            f"{FASHION_MNIST_ROOT}) or set data.root to a directory holding {files}"
        )
    return f"set data.root to a directory holding the MNIST idx files {files}"


def _load_idx_dataset(cfg: DataConfig) -> tuple[tuple[np.ndarray, Tensor], tuple[np.ndarray, Tensor]]:
    hint = _idx_hint(cfg.name)
    root = _root(cfg, FASHION_MNIST_ROOT if cfg.name == "fashion_mnist" else None, hint)
    splits = []
    for images_name, labels_name in _IDX_FILES.values():
        images_path = _find_idx(root, images_name, hint)
        labels_path = _find_idx(root, labels_name, hint)
        images = _read_idx(images_path, ndim=3)
        labels = _read_idx(labels_path, ndim=1)
        if len(images) != len(labels):
            raise UserError(
                f"holds {len(labels)} labels but {images_path.name} holds {len(images)} images",
                where=str(labels_path),
            )
        if labels.size and labels.max() > 9:
            raise UserError(f"labels must be 0..9, found {labels.max()}", where=str(labels_path))
        splits.append((images, torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1]


def _find_idx(root: Path, name: str, hint: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise UserError(f"{root} has neither {name} nor {name}.gz; {hint}", field="data.root")


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an idx file (LeCun's MNIST format, optionally gzipped) of unsigned bytes.

    Header: two zero bytes, type code 0x08 (ubyte), the number of dimensions, then one big-endian
    int32 per dimension; then the data. Anything else is a foreign or truncated file.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise UserError(f"cannot read idx file: {exc}", where=str(path)) from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise UserError(
            f"not an idx file of unsigned bytes with {ndim} dimension(s) (bad magic number "
            f"{raw[:4].hex() or '<empty>'}, expected 000008{ndim:02x})",
            where=str(path),
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise UserError(
            f"{'truncated' if len(raw) < expected else 'trailing bytes'}: the header announces "
            f"shape {dims} ({expected} bytes), the file has {len(raw)} bytes",
            where=str(path),
        )
    # copy: frombuffer gives a read-only array, which torch.from_numpy warns about
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


# --------------------------------------------------------------------------- torchvision datasets


def _size_transform(native: int, size: int) -> list[Callable]:
    """Centred zero-padding up to ``size`` for smaller images, a resize for bigger ones."""
    from torchvision import transforms as T

    if native < size:
        left, top = (size - native) // 2, (size - native) // 2
        return [T.Pad((left, top, size - native - left, size - native - top))]
    if native > size:
        return [T.Resize(size)]
    return []


def _cifar_splits(
    cfg: DataConfig, spec: _Spec, mean: tuple[float, ...], std: tuple[float, ...], seed: int
) -> DataSplits:
    from torchvision import datasets
    from torchvision import transforms as T

    cls, folder = (
        (datasets.CIFAR10, "cifar-10-batches-py")
        if cfg.name == "cifar10"
        else (datasets.CIFAR100, "cifar-100-python")
    )
    hint = (
        f"put the torchvision-format {folder}/ directory (extracted from the CIFAR python "
        f"archive) under data.root"
    )
    root = _root(cfg, None, hint)
    if not (root / folder).is_dir():
        raise UserError(f"{root / folder} does not exist; {hint}", field="data.root")
    try:
        train_base = cls(str(root), train=True, download=False)
        test_base = cls(str(root), train=False, download=False)
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
        raise UserError(f"{root / folder}: {exc}; {hint}", field="data.root") from None

    tail = [T.ToTensor(), T.Normalize(mean, std)]
    eval_tf = T.Compose(_size_transform(32, cfg.input_size) + tail)
    train_tf = T.Compose(
        _size_transform(32, cfg.input_size)
        + [T.RandomCrop(cfg.input_size, padding=spec.max_shift), T.RandomHorizontalFlip()]
        + tail
    )
    return _torchvision_splits(cfg, seed, train_base, test_base, train_tf, eval_tf, len(train_base.classes))


def _imagefolder_splits(
    cfg: DataConfig, spec: _Spec, mean: tuple[float, ...], std: tuple[float, ...], seed: int,
    preprocessing: ImagePreprocessing | None = None,
) -> DataSplits:
    from torchvision import datasets
    from torchvision import transforms as T

    hint = "lay the images out as data.root/train/<class>/*.jpg and data.root/val/<class>/*.jpg"
    root = _root(cfg, None, hint)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"{root / split} does not exist; {hint}", field="data.root")
    bases = []
    for path in (root / "train", root / "val"):
        try:
            bases.append(datasets.ImageFolder(str(path)))
        except (FileNotFoundError, RuntimeError) as exc:  # no class folders / no image files
            raise UserError(f"{path}: {exc}; {hint}", field="data.root") from None
    train_base, test_base = bases
    if train_base.classes != test_base.classes:
        only_train = sorted(set(train_base.classes) - set(test_base.classes))
        only_val = sorted(set(test_base.classes) - set(train_base.classes))
        raise UserError(
            f"train/ and val/ must have the same class folders; only in train: {only_train[:5]}, "
            f"only in val: {only_val[:5]}",
            field="data.root",
        )

    tail = [T.ToTensor(), T.Normalize(mean, std)]
    ratio, mode = (256 / 224, T.InterpolationMode.BILINEAR) if preprocessing is None else (
        preprocessing.resize_ratio, T.InterpolationMode(preprocessing.interpolation))
    eval_tf = T.Compose(
        [T.Resize(int(cfg.input_size * ratio), interpolation=mode), T.CenterCrop(cfg.input_size)] + tail
    )
    train_tf = T.Compose([T.RandomResizedCrop(cfg.input_size, interpolation=mode), T.RandomHorizontalFlip()] + tail)
    return _torchvision_splits(cfg, seed, train_base, test_base, train_tf, eval_tf, len(train_base.classes))


def _torchvision_splits(
    cfg: DataConfig,
    seed: int,
    train_base: Dataset,
    test_base: Dataset,
    train_tf: Callable,
    eval_tf: Callable,
    num_classes: int,
) -> DataSplits:
    train_pos, reward_pos, select_pos = _split_held_out(len(train_base), cfg, seed)
    train_idx, reward_idx = torch.from_numpy(train_pos), torch.from_numpy(reward_pos)
    return DataSplits(
        train=TransformedSubset(train_base, train_idx, train_tf if cfg.augment else eval_tf),
        train_eval=TransformedSubset(train_base, train_idx, eval_tf),
        reward_val=TransformedSubset(train_base, reward_idx, eval_tf),
        select=TransformedSubset(train_base, torch.from_numpy(select_pos), eval_tf),
        test=TransformedSubset(test_base, torch.arange(len(test_base)), eval_tf),
        num_classes=num_classes,
        in_channels=3,
    )
