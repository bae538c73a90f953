"""Image datasets from local files in their standard distribution formats, scaled to [-1, 1].

Every dataset holds its images in memory as uint8 (N, C, H, W) and samples uniformly with
replacement: x1 = 2 u / 255 - 1 for pixel values u in {0, ..., 255} (the digits: 2 u / 16 - 1, u in
{0, ..., 16}), with an optional random horizontal flip per sample (``flip``, probability 1/2).

* ``digits``: scikit-learn's bundled 8 x 8 handwritten digits (1797 images, (1, 8, 8)): works offline.
* ``mnist``: the idx files ``train-images-idx3-ubyte`` (or ``t10k-...``), gzipped or not, (1, 28, 28).
* ``cifar10``: the binary batches ``data_batch_{1..5}.bin`` (or ``test_batch.bin``) of
  ``cifar-10-binary.tar.gz``: records of 1 label byte + 3072 bytes (R, G, B planes of 32 x 32), (3, 32, 32).
* ``image_folder``: every ``*.png`` in a folder (recursively), all the same size; grayscale, RGB
  or RGBA (alpha dropped).

A missing file is a one-line error saying where to put it. (The CIFAR-10 "python" batches are
pickles; flowspec never unpickles files, so only the binary version is read.)
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from flowspec.data.base import Dataset, DatasetOptions
from flowspec.errors import UserError


class ImageDatasetOptions(DatasetOptions):
    flip: bool = Field(False, description="random horizontal flips (probability 1/2 per sample)")


class ImageDataset(Dataset):
    """Base class: subclasses implement :meth:`load` returning uint8 (N, C, H, W) and set ``max_value``."""

    Options: ClassVar[type[ImageDatasetOptions]] = ImageDatasetOptions
    options: ImageDatasetOptions
    max_value: ClassVar[float] = 255.0
    #: the per-sample shape when it is known without reading the images (for ``flowspec validate``)
    known_shape: ClassVar[tuple[int, ...] | None] = None

    def __init__(self, options: ImageDatasetOptions | None = None):
        super().__init__(options)
        images = self.load()
        if images.ndim != 4 or images.shape[0] == 0:
            raise UserError(f"data.kind: {type(self).__name__} found no images")
        self.images = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True))  # uint8 (N, C, H, W)
        self.shape = tuple(self.images.shape[1:])

    def load(self) -> np.ndarray:
        raise NotImplementedError

    def to_float(self, u: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> float32 in [-1, 1]: 2 u / max_value - 1."""
        return u.float() * (2.0 / self.max_value) - 1.0

    def all(self) -> torch.Tensor:
        """Every image in [-1, 1], (N, C, H, W), float32 (no flips)."""
        return self.to_float(self.images)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images drawn uniformly with replacement, float32 (n, C, H, W) in [-1, 1]."""
        idx = torch.randint(0, self.images.shape[0], (n,), generator=generator)
        x = self.to_float(self.images[idx])
        if self.options.flip:
            flip = torch.rand(n, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def std(self) -> torch.Tensor:
        """Per-pixel standard deviation of the sampling distribution (uniform over the images, flips
        included), shape (C, H, W): the population std over the N images (divisor N, not N - 1)."""
        x = self.all().double()
        if self.options.flip:
            x = torch.cat([x, x.flip(-1)])
        return x.std(dim=0, correction=0).float()


# -- scikit-learn's digits ---------------------------------------------------------------------------

class Digits(ImageDataset):
    """scikit-learn's bundled 8 x 8 digits (1797 images, 17 gray levels), shape (1, 8, 8), in [-1, 1]."""

    max_value = 16.0
    known_shape = (1, 8, 8)

    def load(self) -> np.ndarray:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise UserError('data.kind: "digits" needs scikit-learn (pip install scikit-learn)') from None
        return load_digits().images.astype(np.uint8)[:, None]

    def labels(self) -> torch.Tensor:
        from sklearn.datasets import load_digits

        return torch.from_numpy(load_digits().target.astype(np.int64))


# -- files ---------------------------------------------------------------------------------------

class FileDatasetOptions(ImageDatasetOptions):
    root: str = Field("data", description="folder holding the dataset's files")
    split: Literal["train", "test"] = Field("train", description="which part of the dataset")


def _missing(key: str, what: str, where: Path, how: str) -> UserError:
    """``data.KEY: WHAT not found in WHERE (HOW)``: one line saying where to put the files."""
    return UserError(f"data.{key}: {what} not found in {where} ({how})")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format, optionally gzipped): magic 0x0000 08 D (uint8, D dims), D big-endian
    uint32 sizes, then the data. Returns uint8 of those sizes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise UserError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    sizes = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(sizes)):
        raise UserError(f"{path}: truncated idx file ({body.size} bytes for sizes {sizes})")
    return body.reshape(sizes)


class MNIST(ImageDataset):
    """MNIST from its idx files in ``root`` (``train-images-idx3-ubyte[.gz]`` or ``t10k-images-idx3-ubyte[.gz]``),
    shape (1, 28, 28), in [-1, 1]."""

    Options = FileDatasetOptions
    options: FileDatasetOptions
    known_shape = (1, 28, 28)

    def load(self) -> np.ndarray:
        root = Path(self.options.root)
        stem = "train" if self.options.split == "train" else "t10k"
        for name in (f"{stem}-images-idx3-ubyte", f"{stem}-images-idx3-ubyte.gz", f"{stem}-images.idx3-ubyte"):
            if (root / name).is_file():
                return read_idx(root / name)[:, None]
        raise _missing("root", f"MNIST {stem}-images-idx3-ubyte[.gz]", root,
                       f"put {stem}-images-idx3-ubyte.gz from the MNIST distribution in {root}, "
                       "or set data.root to its folder")


class CIFAR10(ImageDataset):
    """CIFAR-10 from its binary batches in ``root`` (the extracted ``cifar-10-binary.tar.gz``:
    ``data_batch_1.bin`` ... ``data_batch_5.bin``, ``test_batch.bin``; ``root`` may also be the folder
    above ``cifar-10-batches-bin``), shape (3, 32, 32), in [-1, 1]."""

    Options = FileDatasetOptions
    options: FileDatasetOptions
    known_shape = (3, 32, 32)
    record = 1 + 3 * 32 * 32

    def files(self) -> tuple[Path, list[Path]]:
        root = Path(self.options.root)
        names = [f"data_batch_{i}.bin" for i in range(1, 6)] if self.options.split == "train" else ["test_batch.bin"]
        for folder in (root, root / "cifar-10-batches-bin"):
            if all((folder / n).is_file() for n in names):
                return folder, [folder / n for n in names]
        return root, []

    def load(self) -> np.ndarray:
        root, paths = self.files()
        if not paths:
            names = "data_batch_1.bin ... data_batch_5.bin" if self.options.split == "train" else "test_batch.bin"
            raise _missing("root", f"CIFAR-10 binary batches ({names})", root,
                           f"extract cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
                           f"into {root}, or set data.root to the folder holding them")
        parts = []
        for path in paths:
            raw = np.fromfile(path, dtype=np.uint8)
            if raw.size % self.record:
                raise UserError(f"{path}: not a CIFAR-10 binary batch ({raw.size} bytes is not a multiple "
                                f"of {self.record})")
            parts.append(raw.reshape(-1, self.record)[:, 1:].reshape(-1, 3, 32, 32))
        return np.concatenate(parts)


class ImageFolderOptions(ImageDatasetOptions):
    root: str = Field("data/images", description="folder of PNG files (searched recursively), all the same size")
    channels: Literal[1, 3] = Field(3, description="1: convert to grayscale; 3: RGB")


class ImageFolder(ImageDataset):
    """Every ``*.png`` under ``root`` (sorted by path), all the same size: shape (channels, H, W), in [-1, 1]."""

    Options = ImageFolderOptions
    options: ImageFolderOptions

    def load(self) -> np.ndarray:
        root = Path(self.options.root)
        paths = sorted(root.rglob("*.png")) if root.is_dir() else []
        if not paths:
            raise _missing("root", "*.png files", root, f"put the PNG images in {root}, or set data.root")
        try:
            from PIL import Image
        except ImportError:
            raise UserError('data.kind: "image_folder" needs Pillow (pip install pillow)') from None
        mode = "L" if self.options.channels == 1 else "RGB"
        images, size = [], None
        for path in paths:
            with Image.open(path) as im:
                a = np.asarray(im.convert(mode), dtype=np.uint8)
            a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
            if size is None:
                size = a.shape
            elif a.shape != size:
                raise UserError(f"{path}: image of size {a.shape[2]} x {a.shape[1]}, but {paths[0]} is "
                                f"{size[2]} x {size[1]} (valid: all images the same size)")
            images.append(a)
        return np.stack(images)
