"""Local data loading (real files where installed), batching, augmentation and models.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``; CIFAR-10
from the JPEG tarball in ``../shared/data``. Each real-data test is skipped,
with the reason, where its files are absent; the loaders' own logic is also
tested on small files written here.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from torch_ar.experiments import data, models

FASHION_AVAILABLE = data.FASHION_MNIST_SYSTEM_DIR.is_dir()
CIFAR_TARBALL = data.source_data_dir() / data.CIFAR10_TARBALL

needs_fashion = pytest.mark.skipif(
    not FASHION_AVAILABLE,
    reason=f"Fashion-MNIST not installed in {data.FASHION_MNIST_SYSTEM_DIR} "
    "(apt-get install dataset-fashion-mnist)",
)
needs_cifar = pytest.mark.skipif(
    not CIFAR_TARBALL.is_file(), reason=f"no {data.CIFAR10_TARBALL} in ../shared/data"
)


def test_source_data_dir_is_beside_the_source_tree() -> None:
    # A wrong level here silently skips every test that reads CIFAR-10.
    root = Path(__file__).resolve().parents[2]
    assert data.source_data_dir() == root.parent / "shared" / "data"


# ------------------------------------------------------------ test files


def write_idx(path: Path, array: torch.Tensor, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.contiguous().numpy().tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_fake_fashion(folder: Path, n_train: int, n_test: int, compress: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    arrays = {
        "train-images-idx3-ubyte": torch.randint(0, 256, (n_train, 28, 28), generator=g),
        "train-labels-idx1-ubyte": torch.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": torch.randint(0, 256, (n_test, 28, 28), generator=g),
        "t10k-labels-idx1-ubyte": torch.arange(n_test) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / name, array.to(torch.uint8), compress)
    return arrays


def write_fake_cifar_folder(root: Path, per_class: int) -> None:
    """A tiny ImageFolder tree cifar10-jpeg/{train,test}/<class>/NNNN.png (lossless)."""
    from PIL import Image

    for split in ("train", "test"):
        for label, name in enumerate(data.CIFAR10_CLASSES):
            folder = root / data.CIFAR10_JPEG_DIR / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.full((32, 32, 3), label * 20 + i, dtype=torch.uint8)
                pixels[0, 0] = torch.tensor([label, i, 7], dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i:04d}.png")


@pytest.fixture
def no_default_locations(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point every default search location at empty folders under tmp_path."""
    monkeypatch.delenv(data.ENV_DATA, raising=False)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system-fashion")
    monkeypatch.setattr(data, "source_data_dir", lambda: tmp_path / "shared-data")
    return tmp_path


# ---------------------------------------------------------- Fashion-MNIST


@needs_fashion
def test_fashion_mnist_real_files() -> None:
    ds = data.load_fashion_mnist()
    assert ds.train_images.shape == (60000, 1, 28, 28)
    assert ds.test_images.shape == (10000, 1, 28, 28)
    assert ds.train_images.dtype == torch.uint8
    assert ds.train_labels.shape == (60000,) and ds.test_labels.shape == (10000,)
    assert ds.train_labels.dtype == torch.int64
    assert torch.equal(ds.train_labels.unique(), torch.arange(10))
    assert torch.equal(ds.test_labels.bincount(), torch.full((10,), 1000))
    # The published per-channel statistics match the data.
    x = ds.train_images.float() / 255
    assert x.mean().item() == pytest.approx(ds.mean[0], abs=1e-3)
    assert x.std().item() == pytest.approx(ds.std[0], abs=1e-3)
    assert ds.num_classes == 10 and ds.image_shape == (1, 28, 28)


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_fashion_mnist_reads_gz_and_raw_idx(tmp_path: Path, compress: bool) -> None:
    arrays = write_fake_fashion(tmp_path / "fashion-mnist", 30, 20, compress)
    ds = data.load_fashion_mnist(tmp_path)  # finds the fashion-mnist/ subfolder
    assert torch.equal(ds.train_images[:, 0], arrays["train-images-idx3-ubyte"].to(torch.uint8))
    assert torch.equal(ds.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert ds.train_images.shape == (30, 1, 28, 28)


def test_fashion_mnist_env_var(monkeypatch: pytest.MonkeyPatch, no_default_locations: Path) -> None:
    write_fake_fashion(no_default_locations / "env", 10, 10, compress=True)
    monkeypatch.setenv(data.ENV_DATA, str(no_default_locations / "env"))
    assert len(data.load_fashion_mnist().train_labels) == 10


def test_fashion_mnist_missing_lists_every_place(no_default_locations: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        data.load_fashion_mnist()
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(no_default_locations / "system-fashion") in message
    assert str(no_default_locations / "shared-data") in message
    assert data.ENV_DATA in message


def test_fashion_mnist_missing_in_given_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        data.load_fashion_mnist(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_read_idx_rejects_corrupt_file(tmp_path: Path) -> None:
    write_idx(tmp_path / "x", torch.zeros(4, 3, dtype=torch.uint8), compress=False)
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        data.read_idx(tmp_path / "x")
    (tmp_path / "y").write_bytes(b"not an idx file")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        data.read_idx(tmp_path / "y")


# ----------------------------------------------------------------- CIFAR-10


@pytest.fixture(scope="module")
def cifar_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cifar-cache")


@needs_cifar
def test_cifar10_tarball_decode_and_cache(
    cifar_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full decode of the 60,000 JPEGs (about 10 s on two cores), then the cached reload."""
    monkeypatch.setenv(data.ENV_CACHE, str(cifar_cache))
    ds = data.load_cifar10(CIFAR_TARBALL.parent)
    assert ds.train_images.shape == (50000, 3, 32, 32)
    assert ds.test_images.shape == (10000, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8
    assert torch.equal(ds.train_labels.bincount(), torch.full((10,), 5000))
    assert torch.equal(ds.test_labels.bincount(), torch.full((10,), 1000))
    means = (ds.train_images.float() / 255).mean(dim=(0, 2, 3))
    assert means.tolist() == pytest.approx(list(ds.mean), abs=2e-3)
    assert ds.classes == data.CIFAR10_CLASSES

    cached = list(cifar_cache.glob("cifar10-*.pt"))
    assert len(cached) == 1
    again = data.load_cifar10(CIFAR_TARBALL)  # the tarball path itself works too
    assert torch.equal(again.train_images, ds.train_images)
    assert torch.equal(again.test_labels, ds.test_labels)


def test_cifar10_extracted_folder_and_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_cifar_folder(tmp_path / "data", per_class=3)
    monkeypatch.setenv(data.ENV_CACHE, str(tmp_path / "cache"))
    ds = data.load_cifar10(tmp_path / "data")
    assert ds.train_images.shape == (30, 3, 32, 32) and ds.test_images.shape == (
        30,
        3,
        32,
        32,
    )
    # Sorted by class, then file: label and file index are encoded in pixel (0, 0).
    assert ds.train_labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert ds.train_images[:, :2, 0, 0].tolist() == [[c, i] for c in range(10) for i in range(3)]
    assert ds.train_images[4, 0, 5, 5].item() == 1 * 20 + 1

    # A truncated cache file is ignored and rewritten.
    (cache,) = (tmp_path / "cache").glob("cifar10-*.pt")
    cache.write_bytes(b"truncated")
    again = data.load_cifar10(tmp_path / "data" / data.CIFAR10_JPEG_DIR)
    assert torch.equal(again.train_images, ds.train_images)
    assert cache.stat().st_size > 1000


def test_cifar10_missing_lists_every_place(no_default_locations: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        data.load_cifar10()
    message = str(info.value)
    shared = no_default_locations / "shared-data"
    for name in (data.CIFAR10_PY_DIR, data.CIFAR10_TARBALL, data.CIFAR10_JPEG_DIR):
        assert str(shared / name) in message
    assert "Nothing is downloaded" in message


def test_load_dataset_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        data.load_dataset("mnist")


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(data.ENV_CACHE, str(tmp_path))
    assert data.cache_dir() == tmp_path
    monkeypatch.delenv(data.ENV_CACHE)
    assert data.cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "torch_ar"


# ------------------------------------------------------------------ batches


def test_tensor_batches_sizes_and_limit() -> None:
    images, labels = torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10)
    assert [len(y) for _, y in data.TensorBatches(images, labels, 4)] == [4, 4, 2]
    assert [len(y) for _, y in data.TensorBatches(images, labels, 4, drop_last=True)] == [4, 4]
    limited = data.TensorBatches(images, labels, 3, limit=2)
    assert len(limited) == 2 and [len(y) for _, y in limited] == [3, 3]
    assert len(data.TensorBatches(images, labels, 3, limit=100)) == 4
    with pytest.raises(ValueError, match="batch_size"):
        data.TensorBatches(images, labels, 0)
    with pytest.raises(ValueError, match="labels"):
        data.TensorBatches(images, labels[:5], 2)


def test_tensor_batches_shuffle_is_seeded() -> None:
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    labels = torch.arange(100)

    def epochs(seed: int) -> list[list[int]]:
        batches = data.TensorBatches(images, labels, 32, shuffle=True, seed=seed)
        return [torch.cat([y for _, y in batches]).tolist() for _ in range(2)]

    first, second = epochs(0)
    assert sorted(first) == list(range(100))  # every example once per epoch
    assert first != list(range(100)) and first != second  # shuffled, anew each epoch
    assert epochs(0) == [first, second]  # the same seed gives the same order
    assert epochs(1)[0] != first
    # Images and labels stay paired.
    for x, y in data.TensorBatches(images, labels, 32, shuffle=True, seed=0):
        assert torch.equal(x.flatten().long(), y)


def test_tensor_batches_transform() -> None:
    images, labels = torch.full((6, 1, 2, 2), 255, dtype=torch.uint8), torch.arange(6)
    batches = data.TensorBatches(images, labels, 4, transform=lambda x: data.normalize(x))
    x, _ = next(iter(batches))
    assert x.dtype == torch.float32 and torch.all(x == 1.0)


def test_normalize_per_channel() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    x01 = images.float() / 255
    mean, std = x01.mean(dim=(0, 2, 3)).tolist(), x01.std(dim=(0, 2, 3)).tolist()
    x = data.normalize(images, mean, std)
    assert x.mean(dim=(0, 2, 3)).abs().max().item() < 1e-5
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max().item() < 1e-4
    assert data.normalize(images, dtype=torch.float64).dtype == torch.float64


# ------------------------------------------------------------- augmentation


def test_random_crop_flip_shape_and_determinism() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    a = data.random_crop_flip(images, generator=torch.Generator().manual_seed(5))
    b = data.random_crop_flip(images, generator=torch.Generator().manual_seed(5))
    c = data.random_crop_flip(images, generator=torch.Generator().manual_seed(6))
    assert a.shape == images.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_crop_flip_is_a_window_of_the_padded_image() -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(1, 256, (32, 2, 8, 8), generator=g, dtype=torch.uint8)
    out = data.random_crop_flip(images, padding=4, generator=torch.Generator().manual_seed(2))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flips = 0
    for n in range(len(images)):
        windows = [
            (padded[n, :, t : t + 8, s : s + 8], flip)
            for t in range(9)
            for s in range(9)
            for flip in (False, True)
        ]
        matches = [f for w, f in windows if torch.equal(out[n], w.flip(-1) if f else w)]
        assert matches, f"image {n} is not a (flipped) window of its padded original"
        flips += matches[0]
    assert 0 < flips < len(images)  # both flipped and unflipped images occur


def test_random_crop_flip_degenerate_cases_are_identity_or_flip() -> None:
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    same = data.random_crop_flip(images, padding=0, flip=False)
    assert torch.equal(same, images)
    flipped = data.random_crop_flip(images, padding=0, generator=torch.Generator().manual_seed(0))
    for n in range(2):
        assert torch.equal(flipped[n], images[n]) or torch.equal(flipped[n], images[n].flip(-1))


# ------------------------------------------------------------------- models


def test_paper_mlp_shape_init_and_size() -> None:
    torch.manual_seed(0)
    model = models.paper_mlp()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 300),
        (300, 300),
        (300, 100),
        (100, 10),
    ]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 3
    assert isinstance(model[-1], nn.Linear)  # linear output
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert weights.std().item() == pytest.approx(0.05, rel=0.02)
    assert all(torch.all(m.bias == 0) for m in linears)
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    default = models.paper_mlp(init="default")
    assert default[1].weight.std().item() < 0.04  # kaiming-uniform, ~0.021 at fan-in 784
    with pytest.raises(ValueError, match="init"):
        models.paper_mlp(init="xavier")


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10"])
@pytest.mark.parametrize("name", ["mlp", "mlp-default-init", "cnn", "cnn-tanh"])
def test_build_model_output_shapes(name: str, dataset: str) -> None:
    c, h, w, classes = models.DATASET_SHAPES[dataset]
    model = models.build_model(name, dataset)
    assert model(torch.randn(3, c, h, w)).shape == (3, classes)


def test_cnn_activation_option() -> None:
    tanh = models.build_model("cnn-tanh", "cifar10")
    assert any(isinstance(m, nn.Tanh) for m in tanh.modules())
    assert not any(isinstance(m, nn.ReLU) for m in tanh.modules())
    assert len([m for m in tanh.modules() if isinstance(m, nn.MaxPool2d)]) == 3
    two = models.cifar_cnn(channels=(8, 16))
    assert two(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="activation"):
        models.cifar_cnn(activation="swish")


def test_resnet18_cifar() -> None:
    model = models.resnet18_cifar(num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    grey = models.build_model("resnet18", "fashion-mnist")
    grey.eval()
    assert grey(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_build_model_accepts_torchvision_names() -> None:
    model = models.build_model("mobilenet_v3_small", "cifar10")
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    grey = models.build_model("mobilenet_v3_small", "fashion-mnist")
    grey.eval()
    assert grey(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # channels repeated to 3


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match="unknown model 'nonsense'"):
        models.build_model("nonsense", "cifar10")
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("ResNet", "cifar10")  # a class, not a constructor
    with pytest.raises(ValueError, match="unknown data set"):
        models.build_model("mlp", "imagenet")
