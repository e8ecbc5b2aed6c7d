"""The table of MNIST-family datasets and where their files live.

Each :class:`DatasetInfo` names the four IDX files with their counts and official MD5s, the
mirrors to download them from (or a local generator, for the synthetic test set), the class
names, and the shipped evaluator that can score samples of it (only MNIST has one; the
synthetic digits are scored with it too, for pipeline tests).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from .idx import DataError, IdxFile
from .synthetic import NUM_TEST, NUM_TRAIN, write_synthetic

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "find_missing_files",
    "fix_hint",
    "get_dataset_info",
    "locate",
    "resolve_data_dir",
]

Generator = Callable[[Path, Collection[str]], object]


@dataclass(frozen=True)
class DatasetInfo:
    """Everything needed to find, obtain and verify one MNIST-family dataset.

    Attributes:
        name: Table key, also the cache folder and env-var stem (``MNIST_DIR``).
        train_images, train_labels, test_images, test_labels: The four IDX files.
        mirrors: Base URLs to download the gzipped files from, tried in order.
        classes: Class names; labels are their indices.
        image_size: Height and width of the images.
        evaluator: Name of the shipped evaluator that scores samples of this dataset, or None
            (evaluation is refused).
        generator: Writes the named ``.gz`` files into a folder instead of downloading them
            (datasets made locally); None for downloaded datasets.
    """

    name: str
    train_images: IdxFile
    train_labels: IdxFile
    test_images: IdxFile
    test_labels: IdxFile
    mirrors: tuple[str, ...]
    classes: tuple[str, ...]
    image_size: int = 28
    evaluator: str | None = None
    generator: Generator | None = None

    @property
    def files(self) -> tuple[IdxFile, IdxFile, IdxFile, IdxFile]:
        """The four files in order: train images, train labels, test images, test labels."""
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)

    @property
    def env_var(self) -> str:
        """Environment variable naming the data folder, e.g. ``MNIST_DIR``."""
        return f"{self.name.upper()}_DIR"

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are ``0 .. num_classes - 1``)."""
        return len(self.classes)


def _standard_files(
    gz_md5: Sequence[str],
    raw_md5: Sequence[str | None] = (None,) * 4,
    counts: tuple[int, int] = (60000, 10000),
) -> dict[str, IdxFile]:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    names += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    kinds = ("images", "labels", "images", "labels")
    sizes = (counts[0], counts[0], counts[1], counts[1])
    keys = ("train_images", "train_labels", "test_images", "test_labels")
    rows = zip(keys, names, kinds, sizes, gz_md5, raw_md5, strict=True)
    return {key: IdxFile(name, kind, count, gz, raw) for key, name, kind, count, gz, raw in rows}


DIGITS = tuple(str(d) for d in range(10))

DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        **_standard_files(
            gz_md5=(
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            ),
            raw_md5=(
                "6bbc9ace898e44ae57da46a324031adb",
                "a25bea736e30d166cdddb491f175f624",
                "2646ac647ad5339dbf082846283269ea",
                "27ae3e4e09519cfbb04c329615203637",
            ),
        ),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        classes=DIGITS,
        evaluator="mnist",
    ),
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        **_standard_files(
            gz_md5=(
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            )
        ),
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
        ),
        classes=(
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
        ),
    ),
    "kmnist": DatasetInfo(
        name="kmnist",
        **_standard_files(
            gz_md5=(
                "bdb82020997e1d708af4cf47b453dcf7",
                "e144d726b3acfaa3e44228e80efcd344",
                "5c965bf0a639b31b8f53240b1b52f4d7",
                "7320c461ea6c1c855c0b718fb2a4b134",
            )
        ),
        mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    ),
    # Generated locally (mnistdiff.synthetic), verified like the others: the MD5s pin its bytes.
    "synthetic": DatasetInfo(
        name="synthetic",
        **_standard_files(
            gz_md5=(
                "85f10371eeab9235d2c0ce0a629604d7",
                "7b260a434edffd68b19341edd3194ee6",
                "732dc88000b1ff74e1990445ce040cb5",
                "a525d5dbc1fb1155664badd885b403a9",
            ),
            raw_md5=(
                "8de73b2d99c65f5474bb5c26a7120fc6",
                "bc45dc2198006f0c84d10762fd07af2e",
                "7327747898e99306f54a57ab2b4085cb",
                "5b6c030042886c2edc09c6f7c8ca600f",
            ),
            counts=(NUM_TRAIN, NUM_TEST),
        ),
        mirrors=(),
        classes=DIGITS,
        evaluator="mnist",
        generator=write_synthetic,
    ),
}


def get_dataset_info(dataset: str | DatasetInfo) -> DatasetInfo:
    """Return the table entry for ``dataset`` (a name in :data:`DATASETS` or a DatasetInfo).

    Raises:
        ValueError: for a name not in the table (the message lists the allowed names).
    """
    if isinstance(dataset, DatasetInfo):
        return dataset
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    return DATASETS[dataset]


def resolve_data_dir(
    data_dir: str | os.PathLike | None, dataset: str | DatasetInfo = "mnist"
) -> Path:
    """Pick the data folder: explicit argument > ``<NAME>_DIR`` env var > user cache.

    The env var is ``MNIST_DIR`` for MNIST, ``FASHION_MNIST_DIR`` and ``KMNIST_DIR`` for the
    others; the fallback is ``~/.cache/mnistdiff/<dataset>``.

    Args:
        data_dir: Folder given by the user (``--data-dir``), or None.
        dataset: Dataset name or info.

    Returns:
        The folder (``~`` expanded); it need not exist yet.
    """
    info = get_dataset_info(dataset)
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(info.env_var, "")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mnistdiff" / info.name


def locate(root: Path, spec: IdxFile) -> Path | None:
    """Return the file for ``spec`` in ``root``, preferring the ``.gz`` name, else None."""
    for name in (spec.gz_name, spec.name):
        try:
            if (root / name).is_file():
                return root / name
        except PermissionError as err:  # e.g. a folder without read/search permission
            raise DataError(
                f"{root}: cannot read the data folder ({err.strerror}); make it readable "
                "(chmod u+rx) or point --data-dir elsewhere"
            ) from None
    return None


def find_missing_files(dataset: str | DatasetInfo, root: str | os.PathLike) -> list[IdxFile]:
    """Return the files of ``dataset`` present in ``root`` neither gzipped nor raw."""
    info = get_dataset_info(dataset)
    return [spec for spec in info.files if locate(Path(root), spec) is None]


def fix_hint(info: DatasetInfo) -> str:
    """How to point the program at good files of ``info`` (ends error messages)."""
    names = ", ".join(spec.gz_name for spec in info.files)
    return (
        f"point --data-dir (or {info.env_var}) at a folder holding the official files "
        f"({names}; gzipped or uncompressed)"
    )
