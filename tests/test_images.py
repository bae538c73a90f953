"""Image datasets from their standard file formats, and their one-line errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from flowspec.data.images import CIFAR10, MNIST, Digits, ImageFolder, read_idx
from flowspec.errors import UserError
from flowspec.testing import checks


def test_digits_offline_scaled_to_minus_one_one():
    d = Digits()
    assert d.shape == (1, 8, 8) and d.images.shape[0] == 1797
    x = d.all()
    assert x.min() == -1 and x.max() == 1
    # pixel values u in {0..16} map to 2 u / 16 - 1 exactly
    assert torch.equal(x, d.images.float() / 8 - 1)
    checks.check_dataset(d, n=20_000)


def _write_idx(path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    imgs = np.zeros((3, 28, 28), dtype=np.uint8)
    imgs[1] = 255
    imgs[2, 0, 0] = 51
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    _write_idx(tmp_path / name, imgs, gz)
    assert read_idx(tmp_path / name).shape == (3, 28, 28)
    d = MNIST(MNIST.Options(root=str(tmp_path)))
    x = d.all()
    assert d.shape == (1, 28, 28)
    assert torch.all(x[0] == -1) and torch.all(x[1] == 1)
    assert x[2, 0, 0, 0].item() == pytest.approx(2 * 51 / 255 - 1)


def _cifar_batches(folder, per_batch=2):
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        recs = []
        for k in range(per_batch):
            img = np.zeros((3, 32, 32), dtype=np.uint8)
            img[0], img[1], img[2] = 255, 0, 128  # R, G, B planes
            img[1, :, :16] = 255  # the left half of the green plane: a flip changes the image
            recs.append(np.concatenate([[k], img.ravel()]).astype(np.uint8))
        np.concatenate(recs).tofile(folder / name)


def test_cifar10_binary_batches_planes_and_flips(tmp_path):
    _cifar_batches(tmp_path / "cifar-10-batches-bin")
    d = CIFAR10(CIFAR10.Options(root=str(tmp_path)))  # the folder above cifar-10-batches-bin works
    assert d.shape == (3, 32, 32) and d.images.shape[0] == 10
    x = d.all()[0]
    assert torch.all(x[0] == 1) and torch.allclose(x[2], torch.full((32, 32), 2 * 128 / 255 - 1), atol=1e-6)
    assert torch.all(x[1, :, :16] == 1) and torch.all(x[1, :, 16:] == -1)
    assert CIFAR10(CIFAR10.Options(root=str(tmp_path), split="test")).images.shape[0] == 2
    flipped = CIFAR10(CIFAR10.Options(root=str(tmp_path), flip=True)).sample(200, torch.Generator().manual_seed(0))
    left = flipped[:, 1, :, :16].mean(dim=(-1, -2))
    assert set(left.tolist()) == {1.0, -1.0}  # both orientations occur, nothing else
    assert torch.all(flipped[:, 1, :, :16] == -flipped[:, 1, :, 16:].flip(-1))
    assert torch.equal(CIFAR10(CIFAR10.Options(root=str(tmp_path))).sample(5, torch.Generator().manual_seed(0)),
                       d.sample(5, torch.Generator().manual_seed(0)))


def test_image_folder_png(tmp_path):
    from PIL import Image

    a = np.zeros((6, 4, 3), dtype=np.uint8)
    a[..., 0] = 255
    Image.fromarray(a).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.full((6, 4, 3), 255, dtype=np.uint8)).save(tmp_path / "sub" / "b.png")
    d = ImageFolder(ImageFolder.Options(root=str(tmp_path)))
    assert d.shape == (3, 6, 4)
    x = d.all()
    assert torch.all(x[0, 0] == 1) and torch.all(x[0, 1:] == -1) and torch.all(x[1] == 1)
    gray = ImageFolder(ImageFolder.Options(root=str(tmp_path), channels=1))
    assert gray.shape == (1, 6, 4)
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(UserError, match=r"c.png: image of size 5 x 5, but .*a.png is 4 x 6"):
        ImageFolder(ImageFolder.Options(root=str(tmp_path)))


@pytest.mark.parametrize("cls, hint", [(CIFAR10, "cifar-10-binary.tar.gz"), (MNIST, "train-images-idx3-ubyte.gz"),
                                       (ImageFolder, "put the PNG images in")])
def test_missing_files_say_where_to_put_them(tmp_path, cls, hint):
    root = tmp_path / "nowhere"
    with pytest.raises(UserError) as info:
        cls(cls.Options(root=str(root)))
    (line,) = info.value.lines
    assert line.startswith("data.root: ") and str(root) in line and hint in line


def test_missing_files_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from flowspec.cli import app

    spec = tmp_path / "c.toml"
    spec.write_text(f'[data]\nkind = "cifar10"\nroot = "{tmp_path / "data"}"\n[objective]\n'
                    'characterization = "lagrangian"\n[network]\nkind = "unet"\n[eval]\nmetrics = []\n')
    result = CliRunner().invoke(app, ["run", str(spec), "--runs-dir", str(tmp_path / "runs")])
    assert isinstance(result.exception, UserError) and result.exception.exit_code == 2
    (line,) = result.exception.lines
    assert line.startswith(f"{spec}: data.root: CIFAR-10 binary batches")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
