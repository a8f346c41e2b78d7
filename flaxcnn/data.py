"""Fashion-MNIST through tensorflow-datasets, and batching on the accelerator.

Loading (host side, once per run):

* `load_split("train" | "test")` returns the tfds ``fashion_mnist`` split as host numpy arrays
  (uint8 ``[N, 28, 28, 1]``, int32 ``[N]``) in tfds's stored order.
* The first call prepares the tfds dataset in the tfds data dir (``data_dir`` argument, else
  ``TFDS_DATA_DIR``, else ``~/tensorflow_datasets``). The four upstream files are looked for
  locally first, so that a machine without internet never touches the network:
  ``manual_dir`` argument > ``FASHION_MNIST_DIR`` > ``<data_dir>/downloads/manual`` > Debian's
  ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist). Every file must match the sha256
  that tfds registers for it; Debian's copies differ only in a normalised gzip header, which is
  restored byte for byte. Verified files are written to ``<data_dir>/downloads/manual``, where
  tfds's download manager finds (and checks) them again. Without local files, a short probe of
  the upstream server decides between tfds's normal download and an immediate `DataError`
  saying how to get the data (instead of tfds's minutes of retries).
* After tfds has read a split once (with TensorFlow), the decoded arrays are cached as
  ``<data_dir>/fashion_mnist/<version>/flaxcnn/<split>.npz`` together with a fingerprint of the
  tfds dataset (its ``dataset_info.json`` and shard sizes) and a sha256 of the arrays. Later
  start-ups read that cache after checking both, without importing TensorFlow.

Batching (device side, inside the jitted step):

* `to_device` puts a whole split on the accelerator (47 MB as uint8 for the training set).
* `epoch_order` is the example-by-example shuffle for an epoch, a pure function of
  ``(seed, epoch)``; `train_batches` cuts it into full batches plus the remainder.
* `eval_batches` pads the last evaluation batch and masks it, so every test example counts once
  with a single compiled shape.
* `to_float` / `gather_batch` turn uint8 images into float32 in [0, 1] and resize them bilinearly
  to the network's side, on the device.

TensorFlow is imported only to prepare or first read the dataset, never at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

DATASET = "fashion_mnist"
SPLITS = ("train", "test")
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
CLASS_NAMES = (
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
ENV_DIR = "FASHION_MNIST_DIR"
# A snapshot written by `python -m flaxcnn.data export` on a machine that prepared the tfds
# dataset, for accelerator hosts without TensorFlow or network (e.g. a lent GPU machine).
ENV_SNAPSHOT = "FLAXCNN_FASHION_MNIST_NPZ"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
UPSTREAM_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
PROBE_TIMEOUT_S = 5.0
CACHE_FORMAT = 1

# The upstream gzip headers carry the original file name and these mtimes; Debian's package keeps
# the compressed payload but normalises the header (no name, mtime 2020-06-05).
_UPSTREAM_MTIME = {
    "train-images-idx3-ubyte.gz": 1504176606,
    "train-labels-idx1-ubyte.gz": 1504176606,
    "t10k-images-idx3-ubyte.gz": 1504176627,
    "t10k-labels-idx1-ubyte.gz": 1504176627,
}
UPSTREAM_FILES = tuple(_UPSTREAM_MTIME)

HOW_TO = (
    "To get Fashion-MNIST without internet access, either\n"
    "  * install Debian's copy: `apt-get install -y dataset-fashion-mnist` (as root, or with sudo;"
    f" it puts the files in {DEBIAN_DIR}), or\n"
    "  * put the four upstream files (" + ", ".join(UPSTREAM_FILES) + ") in a directory and set"
    f" {ENV_DIR}=<that directory> (or pass manual_dir= / --manual-dir), or\n"
    "  * point TFDS_DATA_DIR (or data_dir= / --data-dir) at a tfds data dir in which"
    f" {DATASET} is already prepared;\n"
    "or run once on a machine that can reach " + UPSTREAM_URL + "."
)


class DataError(Exception):
    """The dataset is missing, corrupted, or cannot be prepared."""


# --------------------------------------------------------------------------------------------
# Locating and verifying the upstream files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamFile:
    name: str
    size: int
    sha256: str
    url: str


def registered_checksums() -> dict[str, UpstreamFile]:
    """The four files as tfds registers them (``url_checksums/fashion_mnist.txt``).

    Read from the installed tensorflow-datasets package without importing it.
    """
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("tensorflow-datasets is not installed (pip install tensorflow-datasets)")
    path = Path(list(spec.submodule_search_locations)[0]) / "url_checksums" / f"{DATASET}.txt"
    try:
        text = path.read_text()
    except OSError as e:
        raise DataError(f"cannot read tfds's registered checksums {path}: {e}") from e
    files = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        url, size, sha, name = line.split("\t")[:4]
        files[name] = UpstreamFile(name=name, size=int(size), sha256=sha, url=url)
    if set(files) != set(UPSTREAM_FILES):
        raise DataError(f"{path} does not list the four Fashion-MNIST files: {sorted(files)}")
    return files


def _gzip_payload_offset(data: bytes) -> int | None:
    """Offset of the deflate stream in a gzip member (RFC 1952), or None if not gzip."""
    if len(data) < 18 or data[:3] != b"\x1f\x8b\x08":
        return None
    flags, pos = data[3], 10
    if flags & 4:  # FEXTRA
        pos += 2 + int.from_bytes(data[pos : pos + 2], "little")
    for bit in (8, 16):  # FNAME, FCOMMENT: zero-terminated
        if flags & bit:
            end = data.find(b"\0", pos)
            if end < 0:
                return None
            pos = end + 1
    if flags & 2:  # FHCRC
        pos += 2
    return pos if pos <= len(data) else None


def upstream_header(name: str) -> bytes:
    """The gzip header of the upstream file `name` (FNAME set, original mtime, OS Unix)."""
    return (
        b"\x1f\x8b\x08\x08"
        + _UPSTREAM_MTIME[name].to_bytes(4, "little")
        + b"\x00\x03"
        + name.removesuffix(".gz").encode()
        + b"\0"
    )


def _diagnose(data: bytes) -> str:
    if _gzip_payload_offset(data) is None:
        return "it is not a gzip file"
    d = zlib.decompressobj(wbits=31)
    try:
        raw = d.decompress(data) + d.flush()
    except zlib.error as e:
        return f"its gzip stream is corrupted ({e})"
    if not d.eof:
        return "it is truncated (the gzip stream ends early)"
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    kind = {2049: "IDX labels", 2051: "IDX images"}.get(magic, "not IDX data")
    count = int.from_bytes(raw[4:8], "big") if len(raw) >= 8 else 0
    return (
        f"it is a valid gzip file but holds different data ({kind}, {count} items,"
        f" {len(raw)} bytes uncompressed); a file from another dataset or another split?"
    )


def verify_file(path: str | os.PathLike, expected: UpstreamFile) -> bytes:
    """The bytes of the upstream file `expected.name`, read from `path` and verified.

    Accepts the upstream file itself or Debian's copy (same payload, normalised gzip header),
    whose upstream header is restored. Anything else raises `DataError` naming `path`.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if hashlib.sha256(data).hexdigest() == expected.sha256:
        return data
    offset = _gzip_payload_offset(data)
    if offset is not None:
        restored = upstream_header(expected.name) + data[offset:]
        if hashlib.sha256(restored).hexdigest() == expected.sha256:
            log.info("%s: restored the upstream gzip header (Debian's copy)", path)
            return restored
    raise DataError(
        f"{path} is not the upstream {expected.name}: {_diagnose(data)}. "
        f"sha256 {hashlib.sha256(data).hexdigest()} ({len(data)} bytes), expected "
        f"{expected.sha256} ({expected.size} bytes, tfds's registered checksum; Debian's "
        "copy with its normalised gzip header is accepted too). Replace the file "
        f"(e.g. `apt-get install --reinstall dataset-fashion-mnist`)."
    )


def _local_candidates(manual_dir, data_dir: Path) -> list[tuple[Path, str, bool]]:
    """(directory, description, explicit) in order of preference."""
    out = []
    if manual_dir is not None:
        out.append((Path(manual_dir), "manual_dir", True))
    elif os.environ.get(ENV_DIR):
        out.append((Path(os.environ[ENV_DIR]), f"${ENV_DIR}", True))
    out.append((data_dir / "downloads" / "manual", "tfds's manual dir", False))
    out.append((Path(DEBIAN_DIR), "Debian's dataset-fashion-mnist", False))
    return out


def find_local_files(manual_dir=None, data_dir=None) -> tuple[Path, str] | None:
    """The directory holding the four upstream files, or None when there is none.

    A directory given explicitly (`manual_dir`, ``FASHION_MNIST_DIR``) must hold all four; so must
    any other candidate that holds some of them: partial sets raise `DataError` naming the
    missing files rather than being silently skipped.
    """
    data_dir = resolve_data_dir(data_dir)
    for directory, what, explicit in _local_candidates(manual_dir, data_dir):
        present = [n for n in UPSTREAM_FILES if (directory / n).is_file()]
        if not present and not explicit:
            continue
        missing = [str(directory / n) for n in UPSTREAM_FILES if n not in present]
        if missing:
            raise DataError(f"{what} {directory} lacks " + ", ".join(missing) + ".\n" + HOW_TO)
        return directory, what
    return None


def stage_local_files(source: Path, data_dir: Path) -> Path:
    """Verify the four files in `source` and write them to ``<data_dir>/downloads/manual``."""
    expected = registered_checksums()
    manual = data_dir / "downloads" / "manual"
    verified = {name: verify_file(source / name, expected[name]) for name in UPSTREAM_FILES}
    manual.mkdir(parents=True, exist_ok=True)
    for name, data in verified.items():
        target = manual / name
        if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
            continue
        tmp = target.with_name(f".{name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return manual


def can_download(timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Whether the upstream server answers within `timeout` seconds (honours *_proxy vars).

    Runs in a daemon thread so that a hanging DNS lookup cannot hold the caller up.
    """
    result: list = []

    def probe():
        url = UPSTREAM_URL + "t10k-labels-idx1-ubyte.gz"
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, method="HEAD"), timeout=timeout
            ):
                result.append((True, "reachable"))
        except urllib.error.HTTPError as e:
            result.append((e.code < 500, f"HTTP {e.code} from {UPSTREAM_URL}"))
        except Exception as e:  # noqa: BLE001 - any failure means "no network"
            result.append((False, f"{UPSTREAM_URL} unreachable: {e}"))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        return False, f"{UPSTREAM_URL} did not answer within {timeout:g} s"
    return result[0]


# --------------------------------------------------------------------------------------------
# tfds: preparing, reading, and the decoded cache
# --------------------------------------------------------------------------------------------


def resolve_data_dir(data_dir=None) -> Path:
    """tfds's data dir: `data_dir`, else ``TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")
    return Path(data_dir).expanduser().absolute()


def _builder(data_dir: Path):
    import tensorflow_datasets as tfds  # no TensorFlow import by itself

    return tfds.builder(DATASET, data_dir=str(data_dir))


def _import_tf():
    import tensorflow as tf

    with contextlib.suppress(Exception):  # keep TensorFlow off accelerators that JAX owns
        tf.config.set_visible_devices([], "GPU")
    return tf


@contextlib.contextmanager
def _lock(data_dir: Path):
    """An exclusive lock so that concurrent processes prepare the dataset once."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f".flaxcnn-{DATASET}.lock"
    with open(path, "a") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no locking
            pass
        yield


def _fingerprint(version_dir: Path, split: str) -> dict:
    """What identifies the prepared tfds split: its dataset_info.json and shard files."""
    info = version_dir / "dataset_info.json"
    try:
        info_sha = hashlib.sha256(info.read_bytes()).hexdigest()
    except OSError:
        return {}
    shards = sorted(
        (p.name, p.stat().st_size) for p in version_dir.glob(f"{DATASET}-{split}.*") if p.is_file()
    )
    try:
        package = importlib.metadata.version("tensorflow-datasets")
    except importlib.metadata.PackageNotFoundError:
        package = None
    return {
        "tensorflow_datasets": package,
        "dataset_info_sha256": info_sha,
        "shards": [list(s) for s in shards],
    }


def _arrays_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).data)
    h.update(np.ascontiguousarray(labels, dtype="<i4").data)
    return h.hexdigest()


def _check_arrays(images: np.ndarray, labels: np.ndarray, split: str, where) -> None:
    n = SPLIT_SIZES[split]
    problems = []
    if images.shape != (n, *IMAGE_SHAPE) or images.dtype != np.uint8:
        problems.append(f"images {images.dtype}{list(images.shape)}, expected uint8[{n},28,28,1]")
    if labels.shape != (n,) or labels.dtype != np.int32:
        problems.append(f"labels {labels.dtype}{list(labels.shape)}, expected int32[{n}]")
    elif labels.min() < 0 or labels.max() >= NUM_CLASSES:
        problems.append(f"labels outside [0, {NUM_CLASSES})")
    if problems:
        raise DataError(f"{where}: " + "; ".join(problems))


def _cache_path(version_dir: Path, split: str) -> Path:
    return version_dir / "flaxcnn" / f"{split}.npz"


def _read_cache(version_dir: Path, split: str):
    """The cached split, or None when absent or stale. A corrupted cache is an error."""
    path = _cache_path(version_dir, split)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            images, labels = z["images"], z["labels"]
    except Exception as e:
        raise DataError(f"the cache {path} is corrupted or unreadable ({e}); delete it") from e
    if meta.get("format") != CACHE_FORMAT or meta.get("tfds") != _fingerprint(version_dir, split):
        log.info("%s is stale (the tfds dataset changed); rebuilding it", path)
        return None
    if _arrays_sha256(images, labels) != meta.get("sha256"):
        raise DataError(f"the cache {path} is corrupted (sha256 mismatch); delete it")
    _check_arrays(images, labels, split, path)
    return images, labels


def _find_cache(data_dir: Path, split: str):
    """The cached split under any prepared version of the dataset, newest first, or None.

    Needs neither TensorFlow nor tensorflow_datasets: the cache is valid when it was made by the
    installed tfds package from the tfds files now on disk (see `_fingerprint`).
    """

    def version_key(p: Path):
        return tuple(int(v) if v.isdigit() else -1 for v in p.name.split("."))

    version_dirs = [p.parent.parent for p in (data_dir / DATASET).glob(f"*/flaxcnn/{split}.npz")]
    for version_dir in sorted(version_dirs, key=version_key, reverse=True):
        cached = _read_cache(version_dir, split)
        if cached is not None:
            return cached
    return None


def _write_cache(version_dir: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    path = _cache_path(version_dir, split)
    meta = {
        "format": CACHE_FORMAT,
        "dataset": DATASET,
        "split": split,
        "version": version_dir.name,
        "tfds": _fingerprint(version_dir, split),
        "sha256": _arrays_sha256(images, labels),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{split}.tmp{os.getpid()}.npz")
        np.savez(tmp, images=images, labels=labels, meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
    except OSError as e:  # a read-only data dir: work without the cache
        log.warning("cannot write the cache %s (%s); later start-ups will read tfds again", path, e)


def _read_tfds(builder, split: str):
    _import_tf()
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(split=split, batch_size=-1, shuffle_files=False)
    ex = tfds.as_numpy(ds)
    images = np.asarray(ex["image"], dtype=np.uint8)
    labels = np.asarray(ex["label"]).astype(np.int32)
    _check_arrays(images, labels, split, f"tfds {DATASET}/{split} in {builder.data_dir}")
    return images, labels


def _prepare_tfds(data_dir: Path, manual_dir, download: bool | None) -> str:
    """Prepare the tfds dataset in `data_dir`; returns how it was done."""
    local = find_local_files(manual_dir, data_dir)
    if local is not None:
        source, what = local
        manual = stage_local_files(source, data_dir)
        how = f"prepared from {what} {source}"
        download_config_kw = {"manual_dir": str(manual)}
    else:
        if download is False:
            raise DataError(
                f"{DATASET} is not prepared in {data_dir}, no local copy of its files was found "
                f"and downloading is disabled.\n{HOW_TO}"
            )
        if download is None:
            ok, why = can_download()
            if not ok:
                raise DataError(
                    f"{DATASET} is not prepared in {data_dir}, no local copy of its files was "
                    f"found, and tfds cannot download it ({why}).\n{HOW_TO}"
                )
        how = f"downloaded by tfds from {UPSTREAM_URL}"
        download_config_kw = {}
    _import_tf()
    import tensorflow_datasets as tfds

    log.info("preparing %s in %s (%s)", DATASET, data_dir, how)
    try:
        _builder(data_dir).download_and_prepare(
            download_config=tfds.download.DownloadConfig(**download_config_kw)
        )
    except Exception as e:
        raise DataError(f"tfds could not prepare {DATASET} in {data_dir} ({how}): {e}") from e
    return how


def load_split(
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    download: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The tfds ``fashion_mnist`` split as (uint8 [N,28,28,1], int32 [N]) host arrays.

    Args:
      split: "train" or "test".
      data_dir: the tfds data dir; default ``TFDS_DATA_DIR``, else ``~/tensorflow_datasets``.
      manual_dir: a directory with the four upstream ``.gz`` files; default
        ``FASHION_MNIST_DIR``, else ``<data_dir>/downloads/manual``, else Debian's copy.
      download: when no local files exist: None probes the upstream server for a few seconds and
        lets tfds download if it answers; True lets tfds download without probing; False never
        uses the network.

    Raises `DataError` when the data can be neither found nor downloaded, or a file is wrong.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if os.environ.get(ENV_SNAPSHOT):
        return read_snapshot(os.environ[ENV_SNAPSHOT], split)
    data_dir = resolve_data_dir(data_dir)
    cached = _find_cache(data_dir, split)
    if cached is not None:
        return cached
    with _lock(data_dir):  # then look again: another process may have prepared it meanwhile
        import tensorflow_datasets as tfds  # no TensorFlow import by itself

        version_dir = data_dir / DATASET / str(tfds.builder_cls(DATASET).VERSION)
        cached = _read_cache(version_dir, split)
        if cached is not None:
            return cached
        if not (version_dir / "dataset_info.json").is_file():
            _prepare_tfds(data_dir, manual_dir, download)
        builder = _builder(data_dir)
        out = None
        for s in SPLITS:  # TensorFlow is loaded now: decode and cache both splits at once
            if s != split and _read_cache(version_dir, s) is not None:
                continue
            images, labels = _read_tfds(builder, s)
            _write_cache(version_dir, s, images, labels)
            if s == split:
                out = images, labels
        return out


def export_snapshot(path, data_dir=None, manual_dir=None) -> str:
    """Writes both prepared splits, in tfds's order, to one compressed .npz with their sha256,
    so that a host without TensorFlow can train on exactly this dataset (via ENV_SNAPSHOT)."""
    arrays, digests = {}, {}
    for split in SPLITS:
        images, labels = load_split(split, data_dir=data_dir, manual_dir=manual_dir)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
        digests[split] = _arrays_sha256(images, labels)
    np.savez_compressed(path, sha256=np.array(json.dumps(digests)), **arrays)
    return str(path)


def read_snapshot(path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split from `export_snapshot`'s file, checked against the digests written with it."""
    try:
        with np.load(path) as z:
            digests = json.loads(str(z["sha256"]))
            images, labels = z[f"{split}_images"], z[f"{split}_labels"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable flaxcnn Fashion-MNIST snapshot ({e})") from e
    _check_arrays(images, labels, split, path)
    if _arrays_sha256(images, labels) != digests.get(split):
        raise DataError(f"{path}: the {split} split does not match its recorded sha256")
    return images, labels


def prepare(data_dir=None, manual_dir=None, download: bool | None = None) -> dict:
    """Prepare (if needed) and cache both splits; returns timings and class counts."""
    out = {}
    for split in SPLITS:
        t = time.perf_counter()
        images, labels = load_split(
            split, data_dir=data_dir, manual_dir=manual_dir, download=download
        )
        out[split] = {
            "examples": len(labels),
            "per_class": np.bincount(labels, minlength=NUM_CLASSES).tolist(),
            "seconds": round(time.perf_counter() - t, 3),
        }
    out["data_dir"] = str(resolve_data_dir(data_dir))
    return out


# --------------------------------------------------------------------------------------------
# Device side
# --------------------------------------------------------------------------------------------


def to_device(images, labels, sharding=None) -> tuple[jax.Array, jax.Array]:
    """Put a split on the device (uint8 images stay uint8: 47 MB for the training set).

    `sharding` (a `jax.sharding.Sharding`, or a device) applies to both arrays; with a batch-axis
    sharding each device holds its share of the examples.
    """
    return jax.device_put(images, sharding), jax.device_put(labels, sharding)


def epoch_order(seed, epoch, n: int) -> jax.Array:
    """The training order of epoch `epoch`: a permutation of ``range(n)``, example by example.

    A pure function of ``(seed, epoch)`` (for a given JAX PRNG implementation, threefry by
    default), so a run resumed at an epoch boundary sees the same orders. jit-able with `n` static.
    """
    key = jax.random.fold_in(jax.random.key(seed), epoch)
    return jax.random.permutation(key, n)


def train_batches(order: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array | None]:
    """(full batches ``[n // batch_size, batch_size]``, the last ``n % batch_size`` or None)."""
    n = order.shape[0]
    full = n // batch_size
    batches = order[: full * batch_size].reshape(full, batch_size)
    rest = order[full * batch_size :] if n % batch_size else None
    return batches, rest


def eval_batches(n: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """Indices ``[ceil(n / batch_size), batch_size]`` padded with 0, and a bool mask, True on
    the ``n`` real entries: each example appears exactly once under the mask, one batch shape."""
    num = -(-n // batch_size)
    idx = jnp.arange(num * batch_size, dtype=jnp.int32).reshape(num, batch_size)
    mask = idx < n
    return jnp.where(mask, idx, 0), mask


# PIL's 8-bit resampling (libImaging/Resample.c): coefficients in fixed point with 22 fraction
# bits, each pass rounds to uint8 (horizontal pass first, then vertical).
_PIL_PRECISION_BITS = 22
# uint8 -> float32 / 255 as IEEE division (what torchvision's ToTensor computes); XLA:CPU's own
# division by a constant differs in the last bit for about half the values.
_SCALE_LUT = np.arange(256, dtype=np.float32) / np.float32(255)
RESIZE_METHODS = ("pil", "linear")


@functools.lru_cache(maxsize=64)
def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's bilinear filter from n_in to n_out pixels as (indices, float64 weights), [n_out, T].

    Half-pixel centres, triangle kernel widened by the scale when shrinking (antialias), weights
    normalised over the pixels inside the image (so edges clamp). Upsampling needs T = 2 taps.
    """
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = filterscale  # the bilinear (triangle) filter has support 1
    rows = []
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in)
        x = np.arange(xmin, xmax)
        w = np.maximum(0.0, 1.0 - np.abs((x - center + 0.5) * (1.0 / filterscale)))
        if w.sum() != 0:
            w = w / w.sum()
        rows.append((x[w != 0], w[w != 0]))
    taps = max(len(x) for x, _ in rows)
    idx = np.zeros((n_out, taps), np.int32)
    wts = np.zeros((n_out, taps), np.float64)
    for r, (x, w) in enumerate(rows):
        idx[r, : len(x)], wts[r, : len(x)] = x, w
    return idx, wts


def _resample(x, idx: np.ndarray, wts: np.ndarray, axis: int):
    """sum_t x[..., idx[:, t] on `axis`, ...] * wts[:, t]: a separable resampling pass."""
    shape = [1] * x.ndim
    shape[axis] = -1
    out = None
    for t in range(idx.shape[1]):
        weight = jnp.asarray(wts[:, t]).reshape(shape)
        term = jnp.take(x, jnp.asarray(idx[:, t]), axis=axis) * weight
        out = term if out is None else out + term
    return out


def _pil_pass(x, n_out: int, axis: int):
    """One PIL 8-bit pass on int32 pixel values: fixed-point weights, round, clip to 0..255."""
    idx, wts = _bilinear_taps(x.shape[axis], n_out)
    one = 1 << _PIL_PRECISION_BITS
    fixed = np.trunc(np.where(wts < 0, -0.5 + wts * one, 0.5 + wts * one)).astype(np.int32)
    acc = _resample(x, idx, fixed, axis) + (1 << (_PIL_PRECISION_BITS - 1))
    return jnp.clip(acc >> _PIL_PRECISION_BITS, 0, 255)


def to_float(images, side: int, dtype=jnp.float32, method: str = "pil") -> jax.Array:
    """uint8 ``[B, H, W, C]`` → `dtype` ``[B, side, side, C]`` in [0, 1], on the device; jit-able.

    The book's ``transforms.Resize(side)`` then ``ToTensor()``, separable and gather-based:

    * ``method="pil"`` (default) reproduces PIL's bilinear ``Image.resize`` on uint8 (what
      torchvision does to the book's PIL images) bit for bit: 8-bit fixed-point weights, the
      horizontal pass rounded to uint8 before the vertical one. Then ``/ 255`` as IEEE float32
      division, exactly ``ToTensor``. Tested equal to PIL + ToTensor on real images.
    * ``method="linear"`` is the same bilinear filter in float32 without the two roundings
      (half-pixel centres, clamped edges: ``F.interpolate(mode="bilinear",
      align_corners=False)`` and ``jax.image.resize`` when upsampling), within 1e-5 of them and
      within 1/255 of the book's pixels.

    At ``side`` equal to the input side both are the scaling alone.
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"method must be one of {RESIZE_METHODS}, not {method!r}")
    if images.dtype != jnp.uint8:
        raise TypeError(f"to_float takes uint8 images, not {images.dtype}")
    b, h, w, c = images.shape
    lut = jnp.asarray(_SCALE_LUT)
    if (side, side) == (h, w):
        return jnp.take(lut, images.astype(jnp.int32)).astype(dtype)
    if method == "pil":
        x = _pil_pass(images.astype(jnp.int32), side, axis=2)
        x = _pil_pass(x, side, axis=1)
        return jnp.take(lut, x).astype(dtype)
    x = jnp.take(lut, images.astype(jnp.int32))
    for axis in (2, 1):
        idx, wts = _bilinear_taps(x.shape[axis], side)
        x = _resample(x, idx, wts.astype(np.float32), axis)
    return x.astype(dtype)


def gather_batch(images, labels, indices, side: int, dtype=jnp.float32, method: str = "pil"):
    """The batch ``indices`` of a split held on the device, as (float images, labels); jit-able
    with `side`, `dtype` and `method` static."""
    x = to_float(jnp.take(images, indices, axis=0), side, dtype, method)
    return x, jnp.take(labels, indices, axis=0)


# --------------------------------------------------------------------------------------------
# Command line: python -m flaxcnn.data prepare
# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flaxcnn.data", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="prepare the tfds dataset and the cache (idempotent)")
    p.add_argument(
        "--data-dir", help="tfds data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)"
    )
    p.add_argument(
        "--manual-dir", help=f"directory with the four upstream files (default: ${ENV_DIR})"
    )
    p.add_argument("--no-download", action="store_true", help="never use the network")
    e = sub.add_parser("export", help=f"write both splits to one .npz for ${ENV_SNAPSHOT}")
    e.add_argument("path")
    e.add_argument("--data-dir", help="tfds data dir")
    args = parser.parse_args(argv)
    if args.command == "export":
        try:
            print(export_snapshot(args.path, args.data_dir))
        except DataError as err:
            print(f"error: {err}", flush=True)
            return 1
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    try:
        t = time.perf_counter()
        out = prepare(args.data_dir, args.manual_dir, download=False if args.no_download else None)
    except DataError as e:
        print(f"error: {e}", flush=True)
        return 1
    for split in SPLITS:
        s = out[split]
        print(f"{split}: {s['examples']} examples, per class {s['per_class']} ({s['seconds']} s)")
    print(f"cached in {out['data_dir']} ({time.perf_counter() - t:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
