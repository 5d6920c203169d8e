"""Local-only data loading for the training examples: Fashion-MNIST and CIFAR-10.

Nothing here downloads. Images come back as uint8 tensors in NCHW layout and
stay uint8 until a batch is drawn, so a whole data set fits on the device;
normalisation and augmentation run per batch, vectorised, on the batch's device.

Where the data is looked for (first hit wins):

- Fashion-MNIST: ``data_dir`` if given, else ``$TORCH_AR_DATA``, the Debian
  package's location ``/usr/share/datasets/fashion-mnist``
  (``apt-get install dataset-fashion-mnist``) and ``../shared/data`` beside the
  source tree. The four IDX files may be gzipped or raw.
- CIFAR-10: ``data_dir`` if given, else ``$TORCH_AR_DATA`` and
  ``../shared/data`` beside the source tree; in each, the original
  ``cifar-10-batches-py`` folder (read by torchvision, ``download=False``), the
  JPEG tarball ``cifar10-jpeg.tar.gz`` or its extracted ``cifar10-jpeg`` folder
  (ImageFolder layout). JPEGs are decoded once and cached as a single ``.pt``
  file in ``$TORCH_AR_CACHE`` (default ``~/.cache/torch_ar``).

Example::

    from torch_ar.experiments import data
    ds = data.load_fashion_mnist()
    batches = data.TensorBatches(ds.train_images, ds.train_labels, 64, shuffle=True, seed=0)
    for x, y in batches:
        x = data.normalize(x, ds.mean, ds.std)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ENV_DATA = "TORCH_AR_DATA"
ENV_CACHE = "TORCH_AR_CACHE"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_TARBALL = "cifar10-jpeg.tar.gz"
CIFAR10_JPEG_DIR = "cifar10-jpeg"
CIFAR10_PY_DIR = "cifar-10-batches-py"
DATASETS = ("fashion-mnist", "cifar10")

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = (
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
# Per-channel statistics of the training sets, on the [0, 1] scale.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
logger = logging.getLogger(__name__)
_CACHE_FORMAT = 1  # bump when the cached tensor layout changes


@dataclass
class ImageDataset:
    """A data set held in memory: uint8 images (N, C, H, W) and int64 labels (N,)."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_images.shape[1:]
        return (c, h, w)


# ---------------------------------------------------------------- locations


def source_data_dir() -> Path:
    """``../shared/data`` relative to the source tree's root (may not exist)."""
    # this file is <root>/torch_ar/experiments/data.py
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def cache_dir() -> Path:
    """Folder for decoded data: ``$TORCH_AR_CACHE`` or ``~/.cache/torch_ar``."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "torch_ar"


def _search_roots(
    data_dir: str | os.PathLike[str] | None, extra: Sequence[Path] = ()
) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    roots = []
    if os.environ.get(ENV_DATA):
        roots.append(Path(os.environ[ENV_DATA]).expanduser())
    roots.extend(extra)
    roots.append(source_data_dir())
    return roots


def _not_found(what: str, looked: Sequence[Path], how: str) -> FileNotFoundError:
    places = "\n".join(f"  - {p}" for p in looked)
    return FileNotFoundError(
        f"{what} not found. Looked in:\n{places}\n{how}\n"
        f"Pass a folder with --data-dir / data_dir=..., or set ${ENV_DATA}."
    )


# ------------------------------------------------------------ Fashion-MNIST


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read one IDX file (gzipped if the name ends in .gz) into a uint8 tensor."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = 1
    for d in dims:
        count *= d
    if len(raw) - offset != count:
        raise ValueError(
            f"{path}: header says {dims} ({count} bytes), file has {len(raw) - offset}"
        )
    return torch.frombuffer(bytearray(raw[offset:]), dtype=torch.uint8).reshape(dims)


def _find_idx_dir(roots: Sequence[Path]) -> tuple[Path | None, list[Path]]:
    looked = []
    for root in roots:
        for folder in (root, root / "fashion-mnist", root / "FashionMNIST" / "raw"):
            looked.append(folder)
            if all(_idx_file(folder, stem) for stem in _IDX_FILES.values()):
                return folder, looked
    return None, looked


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Load Fashion-MNIST from the four local IDX files: images (N, 1, 28, 28) uint8.

    Example::

        ds = load_fashion_mnist()  # 60000 train, 10000 test
    """
    folder, looked = _find_idx_dir(_search_roots(data_dir, [FASHION_MNIST_SYSTEM_DIR]))
    if folder is None:
        raise _not_found(
            "Fashion-MNIST (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])",
            looked,
            "On Debian/Ubuntu: apt-get install dataset-fashion-mnist "
            f"(installs them in {FASHION_MNIST_SYSTEM_DIR}).",
        )
    parts = {key: read_idx(_idx_file(folder, stem)) for key, stem in _IDX_FILES.items()}  # type: ignore[arg-type]
    for split in ("train", "test"):
        images, labels = parts[f"{split}_images"], parts[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{folder}: inconsistent {split} files "
                f"{tuple(images.shape)} / {tuple(labels.shape)}"
            )
    return ImageDataset(
        name="fashion-mnist",
        train_images=parts["train_images"].unsqueeze(1),
        train_labels=parts["train_labels"].long(),
        test_images=parts["test_images"].unsqueeze(1),
        test_labels=parts["test_labels"].long(),
        classes=FASHION_MNIST_CLASSES,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
    )


# ----------------------------------------------------------------- CIFAR-10


def _find_cifar10(roots: Sequence[Path]) -> tuple[str, Path] | tuple[None, list[Path]]:
    looked: list[Path] = []
    for root in roots:
        candidates = [
            ("py", root if root.name == CIFAR10_PY_DIR else root / CIFAR10_PY_DIR),
            ("tar", root if root.name.endswith(".tar.gz") else root / CIFAR10_TARBALL),
            ("folder", root if root.name == CIFAR10_JPEG_DIR else root / CIFAR10_JPEG_DIR),
        ]
        for kind, path in candidates:
            looked.append(path)
            if kind == "py" and (path / "data_batch_1").is_file():
                return kind, path
            if kind == "tar" and path.is_file():
                return kind, path
            if kind == "folder" and (path / "train").is_dir() and (path / "test").is_dir():
                return kind, path
    return None, looked


def load_cifar10(
    data_dir: str | os.PathLike[str] | None = None, use_cache: bool = True
) -> ImageDataset:
    """Load CIFAR-10 from local files: images (N, 3, 32, 32) uint8.

    JPEG sources are decoded once and cached (see :func:`cache_dir`).

    Example::

        ds = load_cifar10()  # 50000 train, 10000 test
    """
    kind, found = _find_cifar10(_search_roots(data_dir))
    if kind is None:
        raise _not_found(
            f"CIFAR-10 ({CIFAR10_PY_DIR}/, {CIFAR10_TARBALL} or "
            f"{CIFAR10_JPEG_DIR}/{{train,test}}/<class>/*.jpg)",
            found,  # type: ignore[arg-type]
            "Nothing is downloaded: put the original python batches or the JPEG "
            "tarball in one of these places.",
        )
    path = found  # type: ignore[assignment]
    if kind == "py":
        parts = _read_cifar10_py(path)
    else:
        parts = _cached_decode(kind, path) if use_cache else _decode_jpegs(kind, path)
    return ImageDataset(
        name="cifar10",
        **parts,
        classes=CIFAR10_CLASSES,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    )


def _read_cifar10_py(folder: Path) -> dict[str, torch.Tensor]:
    from torchvision.datasets import CIFAR10

    parts = {}
    for split, train in (("train", True), ("test", False)):
        ds = CIFAR10(str(folder.parent), train=train, download=False)
        parts[f"{split}_images"] = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        parts[f"{split}_labels"] = torch.tensor(ds.targets, dtype=torch.long)
    return parts


def _cache_file(kind: str, path: Path) -> Path:
    stat = path.stat() if kind == "tar" else (path / "train").stat()
    key = f"{_CACHE_FORMAT}|{kind}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return cache_dir() / f"cifar10-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def _cached_decode(kind: str, path: Path) -> dict[str, torch.Tensor]:
    cache = _cache_file(kind, path)
    if cache.is_file():
        try:
            return torch.load(cache, weights_only=True)
        # A truncated or foreign file fails in many ways (the unpickler's own
        # errors included); any of them just means: decode again.
        except Exception:
            logger.warning(
                "ignoring unreadable cache file %s; decoding again", cache, exc_info=True
            )
            cache.unlink(missing_ok=True)
    parts = _decode_jpegs(kind, path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        torch.save(parts, tmp)
        os.replace(tmp, cache)  # atomic: a concurrent reader never sees half a file
    except OSError:
        pass  # read-only home: work without a cache
    return parts


def _decode_jpegs(kind: str, path: Path) -> dict[str, torch.Tensor]:
    """Decode every JPEG (sorted by split, class, file name) into uint8 tensors."""
    from PIL import Image

    images: dict[str, list[tuple[str, int, torch.Tensor]]] = {"train": [], "test": []}
    class_index = {name: i for i, name in enumerate(CIFAR10_CLASSES)}

    def add(rel: str, data: bytes) -> None:
        parts = rel.split("/")
        if len(parts) < 3 or not parts[-1].lower().endswith((".jpg", ".jpeg", ".png")):
            return
        split, label = parts[-3], parts[-2]
        if split not in images or label not in class_index:
            return
        with Image.open(io.BytesIO(data)) as im:
            pixels = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
            size = im.size
        if size != (32, 32):
            raise ValueError(f"{rel}: expected a 32x32 image, got {size[0]}x{size[1]}")
        images[split].append((rel, class_index[label], pixels.view(32, 32, 3)))

    if kind == "tar":
        # Streaming read: one pass over the gzip, no extraction to disk.
        with tarfile.open(path, "r:gz") as tf:
            for member in tf:
                if member.isfile():
                    f = tf.extractfile(member)
                    if f is not None:
                        add(member.name, f.read())
    else:
        for file in sorted(path.glob("*/*/*")):
            if file.is_file():
                add(file.relative_to(path).as_posix(), file.read_bytes())

    parts = {}
    for split, items in images.items():
        if not items:
            raise FileNotFoundError(f"{path}: no {split}/<class>/*.jpg images found")
        items.sort(key=lambda item: (item[1], item[0]))
        parts[f"{split}_images"] = (
            torch.stack([t for _, _, t in items]).permute(0, 3, 1, 2).contiguous()
        )
        parts[f"{split}_labels"] = torch.tensor([label for _, label, _ in items], dtype=torch.long)
    return parts


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Load ``"fashion-mnist"`` or ``"cifar10"`` by name."""
    loaders: dict[str, Callable[..., ImageDataset]] = {
        "fashion-mnist": load_fashion_mnist,
        "cifar10": load_cifar10,
    }
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}; choose from {sorted(loaders)}")
    return loaders[name](data_dir)


# ------------------------------------------------------------------ batches


class TensorBatches:
    """Mini-batches over in-memory tensors, optionally shuffled each epoch.

    The order is drawn from a ``torch.Generator`` seeded once, so epoch k of
    two runs with the same seed is identical. Tensors are moved to ``device``
    once; each batch is an index into them.

    Example::

        batches = TensorBatches(images, labels, 64, shuffle=True, seed=0, limit=100)
        for x, y in batches: ...
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        limit: int | None = None,
        device: torch.device | str | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        self.images = images.to(device) if device is not None else images
        self.labels = labels.to(self.images.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.limit = limit
        self.transform = transform
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.images)
        count = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return count if self.limit is None else min(count, self.limit)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches_from(0)

    def batches_from(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from batch ``start`` on (a run resumed inside an
        epoch): the order is drawn as for the whole epoch, so the generator
        moves on alike, and the batches before ``start`` are not transformed."""
        n = len(self.images)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.images.device)
        else:
            order = None
        for b in range(start, len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, n)
            if order is None:
                x, y = self.images[lo:hi], self.labels[lo:hi]
            else:
                idx = order[lo:hi]
                x, y = self.images[idx], self.labels[idx]
            yield (self.transform(x) if self.transform is not None else x), y


# ------------------------------------------------------ batch preprocessing


def normalize(
    images: torch.Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [0, 1], then per-channel ``(x - mean) / std`` if given."""
    x = images.to(dtype) / 255.0
    if mean is not None and std is not None:
        m = torch.tensor(mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - m) / s
    return x


def random_crop_flip(
    images: torch.Tensor,
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop after zero padding plus random horizontal flip, for a whole batch at once.

    The random offsets are drawn on the CPU from ``generator`` (reproducible on
    any device) and applied with one gather on the batch's device.
    """
    n, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
    if flip:
        flipped = (torch.rand(n, generator=generator) < 0.5).to(dev)
    else:
        flipped = torch.zeros(n, dtype=torch.bool, device=dev)
    rows = top[:, None] + torch.arange(h, device=dev)  # (n, h)
    span = torch.arange(w, device=dev)
    cols = left[:, None] + torch.where(flipped[:, None], w - 1 - span, span)  # (n, w)
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
