"""flaxcnn.data on the real Fashion-MNIST, offline.

The session fixture loads the tfds dataset from the default data dir (``TFDS_DATA_DIR`` or
~/tensorflow_datasets), preparing it from the local upstream files if `.ci/setup` has not done
so yet; nothing here uses the network. The error cases run in fresh temporary data dirs with the
network blocked.
"""

import gzip
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcnn import data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def splits():
    return {s: data.load_split(s, download=False) for s in data.SPLITS}


@pytest.fixture(scope="session")
def source_dir():
    """The directory with the four upstream files (Debian's copy, FASHION_MNIST_DIR, ...)."""
    found = data.find_local_files()
    if found is None:
        pytest.skip("no local copy of the upstream files (dataset was downloaded by tfds)")
    return found[0]


def read_idx(source_dir, split):
    prefix = {"train": "train", "test": "t10k"}[split]
    with gzip.open(source_dir / f"{prefix}-images-idx3-ubyte.gz") as f:
        raw = f.read()
        assert int.from_bytes(raw[:4], "big") == 2051
        images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28, 1)
    with gzip.open(source_dir / f"{prefix}-labels-idx1-ubyte.gz") as f:
        raw = f.read()
        assert int.from_bytes(raw[:4], "big") == 2049
        labels = np.frombuffer(raw, np.uint8, offset=8)
    return images, labels


def pairs(images, labels):
    """Each (image, label) pair as one 785-byte record, sorted: the pairs as a multiset."""
    rec = np.concatenate([images.reshape(len(images), -1), labels.astype(np.uint8)[:, None]], 1)
    return np.sort(np.ascontiguousarray(rec).view(f"V{rec.shape[1]}").ravel())


# ------------------------------------------------------------------------------------------
# The splits
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split,n", [("train", 60_000), ("test", 10_000)])
def test_split_shapes_and_classes(splits, split, n):
    images, labels = splits[split]
    assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int32
    assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10
    assert len(data.CLASS_NAMES) == data.NUM_CLASSES == 10


@pytest.mark.parametrize("split", data.SPLITS)
def test_pairs_equal_the_idx_files(splits, source_dir, split):
    images, labels = splits[split]
    idx_images, idx_labels = read_idx(source_dir, split)
    assert len(idx_labels) == len(labels)
    assert np.array_equal(pairs(images, labels), pairs(idx_images, idx_labels))
    # tfds stores its own fixed shuffle of the examples, not the IDX order
    assert not np.array_equal(labels, idx_labels)


def test_later_startup_reads_the_cache_without_tensorflow(splits):
    """A second process neither prepares nor imports TensorFlow or tfds (made unimportable)."""
    code = (
        "import sys, time; t = time.perf_counter()\n"
        "sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None\n"
        "from flaxcnn import data\n"
        "x, y = data.load_split('train', download=False)\n"
        "assert x.shape == (60000, 28, 28, 1) and int(y.sum()) == 270000\n"
        "print(f'{time.perf_counter() - t:.2f}')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"later start-up (import + load_split('train')): {out.stdout.strip()} s")


# ------------------------------------------------------------------------------------------
# Shuffling and batching
# ------------------------------------------------------------------------------------------


def test_epoch_order_is_a_deterministic_permutation():
    n = 60_000
    a = np.asarray(data.epoch_order(0, 3, n))
    assert np.array_equal(np.sort(a), np.arange(n))
    assert np.array_equal(a, np.asarray(data.epoch_order(0, 3, n)))
    jitted = jax.jit(data.epoch_order, static_argnames="n")
    assert np.array_equal(a, np.asarray(jitted(jnp.int32(0), jnp.int32(3), n=n)))
    # a new order every epoch and for every seed, example by example (not batch by batch)
    b = np.asarray(data.epoch_order(0, 4, n))
    c = np.asarray(data.epoch_order(1, 3, n))
    assert (a != b).mean() > 0.99 and (a != c).mean() > 0.99
    batches_a = {frozenset(r) for r in a[: n // 256 * 256].reshape(-1, 256).tolist()}
    batches_b = {frozenset(r) for r in b[: n // 256 * 256].reshape(-1, 256).tolist()}
    assert not batches_a & batches_b


def test_train_batches_keep_every_example():
    order = data.epoch_order(7, 0, 60_000)
    full, rest = data.train_batches(order, 256)
    assert full.shape == (234, 256) and rest.shape == (96,)
    assert np.array_equal(np.concatenate([np.ravel(full), rest]), np.asarray(order))
    full, rest = data.train_batches(order, 250)
    assert full.shape == (240, 250) and rest is None


@pytest.mark.parametrize("batch_size", [128, 256, 999])
def test_eval_batches_count_each_example_once(batch_size):
    idx, mask = data.eval_batches(10_000, batch_size)
    assert idx.shape == mask.shape == (-(-10_000 // batch_size), batch_size)
    assert int(mask.sum()) == 10_000
    assert np.array_equal(np.sort(np.asarray(idx)[np.asarray(mask)]), np.arange(10_000))


def test_masked_evaluation_counts_exactly_10000(splits):
    """A jitted evaluation step over the test set on the device: one compiled shape."""
    images, labels = data.to_device(*splits["test"])
    means = jnp.stack([images[labels == k].mean(0) for k in range(10)])  # a toy classifier

    @jax.jit
    def step(images, labels, idx, mask):
        x, y = data.gather_batch(images, labels, idx, 28)
        pred = jnp.argmin(((x[:, None] * 255 - means[None]) ** 2).sum((2, 3, 4)), -1)
        return mask.sum(), (mask & (pred == y)).sum(), jnp.zeros(10, jnp.int32).at[y].add(mask)

    idx, mask = data.eval_batches(10_000, 256)
    total, correct, per_class = 0, 0, 0
    for i in range(idx.shape[0]):
        t, c, k = step(images, labels, idx[i], mask[i])
        total, correct, per_class = total + int(t), correct + int(c), per_class + np.asarray(k)
    assert total == 10_000 and per_class.tolist() == [1000] * 10
    assert 0.5 < correct / total < 0.8  # a nearest-mean classifier: about 68 %
    assert step._cache_size() == 1


def test_to_device_and_gather_batch(splits):
    images, labels = splits["train"]
    d_images, d_labels = data.to_device(images, labels)
    assert isinstance(d_images, jax.Array) and d_images.dtype == jnp.uint8
    assert d_images.nbytes == 47_040_000
    idx = data.epoch_order(0, 0, 60_000)[:128]
    gather = jax.jit(data.gather_batch, static_argnames=("side", "dtype", "method"))
    x, y = gather(d_images, d_labels, idx, side=96)
    assert x.shape == (128, 96, 96, 1) and x.dtype == jnp.float32 and y.dtype == jnp.int32
    ref = np.asarray(data.to_float(images[np.asarray(idx)], 96))
    assert np.array_equal(np.asarray(x), ref) and np.array_equal(y, labels[np.asarray(idx)])
    xb, _ = gather(d_images, d_labels, idx, side=96, dtype=jnp.bfloat16)
    assert xb.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------
# The device resize against the book (PIL) and float references
# ------------------------------------------------------------------------------------------


def book_transform(images, side):
    """d2l's `transforms.Resize(side)` on the PIL image, then `ToTensor()`, in NHWC."""
    from PIL import Image

    out = [
        np.asarray(Image.fromarray(im[..., 0]).resize((side, side), Image.BILINEAR))
        for im in images
    ]
    return (np.stack(out)[..., None].astype(np.float32)) / np.float32(255)


def linear_reference(images, side):
    """Float bilinear, half-pixel centres, clamped edges, written out in NumPy (float64)."""
    x = images[..., 0].astype(np.float64) / 255
    n = x.shape[1]
    src = np.clip((np.arange(side) + 0.5) * n / side - 0.5, 0, n - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    f = src - i0
    x = x[:, :, i0] * (1 - f) + x[:, :, i1] * f
    x = x[:, i0, :] * (1 - f)[:, None] + x[:, i1, :] * f[:, None]
    return x[..., None]


@pytest.fixture(scope="module")
def sample(splits):
    images, _ = splits["test"]
    return images[np.random.default_rng(0).choice(len(images), 200, replace=False)]


@pytest.mark.parametrize("side", [96, 224])
def test_resize_is_the_books_pil_resize_bit_for_bit(sample, side):
    got = np.asarray(jax.jit(data.to_float, static_argnums=1)(sample, side))
    assert got.shape == (len(sample), side, side, 1) and got.dtype == np.float32
    assert np.array_equal(got, book_transform(sample, side))


@pytest.mark.parametrize("side", [96, 224])
def test_linear_resize_matches_float_references(sample, side):
    f = jax.jit(data.to_float, static_argnames=("side", "method"))
    got = np.asarray(f(sample, side=side, method="linear"))
    assert np.abs(got - linear_reference(sample, side)).max() < 1e-5
    jax_ref = jax.image.resize(sample.astype(np.float32) / 255, got.shape, "bilinear")
    assert np.abs(got - np.asarray(jax_ref)).max() < 1e-5
    # the book rounds to uint8 after each of PIL's two passes: within one grey level
    assert np.abs(got - book_transform(sample, side)).max() <= 1 / 255 + 1e-6
    # and the default, book-exact resize is within the same distance of the float one
    book = np.asarray(f(sample, side=side))
    assert np.abs(book - linear_reference(sample, side)).max() <= 1 / 255 + 1e-6


def test_resize_matches_torch_interpolate(sample):
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(sample).permute(0, 3, 1, 2).float() / 255
    ref = torch.nn.functional.interpolate(x, size=(96, 96), mode="bilinear", align_corners=False)
    got = np.asarray(data.to_float(sample, 96, method="linear"))
    assert np.abs(got - ref.permute(0, 2, 3, 1).numpy()).max() < 1e-5


@pytest.mark.parametrize("method", data.RESIZE_METHODS)
def test_side_28_is_only_the_scaling(sample, method):
    got = np.asarray(
        jax.jit(data.to_float, static_argnums=(1, 2, 3))(sample, 28, jnp.float32, method)
    )
    # exactly torchvision's ToTensor: float32 division by 255
    assert np.array_equal(got, sample.astype(np.float32) / np.float32(255))
    assert got.min() == 0.0 and got.max() == 1.0


# ------------------------------------------------------------------------------------------
# Missing, corrupted, truncated and wrong files: errors that name the file, never the network
# ------------------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, no Debian fallback, no FASHION_MNIST_DIR: only what the test provides."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(data, "DEBIAN_DIR", str(tmp_path / "no-debian-here"))
    monkeypatch.delenv(data.ENV_DIR, raising=False)
    return tmp_path


@pytest.fixture
def copies(source_dir, offline):
    """A copy of the four upstream files (as found locally) in a temporary directory."""
    d = offline / "files"
    d.mkdir()
    for name in data.UPSTREAM_FILES:
        shutil.copy(source_dir / name, d / name)
    return d


def load_fails(match, **kwargs):
    t = time.perf_counter()
    with pytest.raises(data.DataError, match=match) as e:
        data.load_split("test", **kwargs)
    assert time.perf_counter() - t < 10
    return str(e.value)


def assert_not_prepared(data_dir):
    assert not (Path(data_dir) / data.DATASET).exists()


def test_nothing_found_fails_fast_with_how_to(offline):
    data_dir = offline / "tfds"
    # First without the probe: the lookup's one-time work (seconds when the other worker
    # loads both cores) stay out of the timed call below.
    msg = load_fails("downloading is disabled", data_dir=data_dir, download=False)
    assert "apt-get install -y dataset-fashion-mnist" in msg
    t = time.perf_counter()
    msg = load_fails("cannot download", data_dir=data_dir)  # probes; the probe fails at once
    assert time.perf_counter() - t < 5
    assert "apt-get install -y dataset-fashion-mnist" in msg and data.ENV_DIR in msg
    assert_not_prepared(data_dir)


def test_can_download_is_false_without_network(offline):
    t = time.perf_counter()
    ok, why = data.can_download(timeout=2)
    assert not ok and "unreachable" in why and time.perf_counter() - t < 3


def test_missing_files_are_named(offline, copies, monkeypatch):
    (copies / "t10k-labels-idx1-ubyte.gz").unlink()
    msg = load_fails("lacks", data_dir=offline / "tfds", manual_dir=copies)
    assert str(copies / "t10k-labels-idx1-ubyte.gz") in msg
    assert "train-images" not in msg.split("lacks")[1].split("\n")[0]
    empty = offline / "empty"
    empty.mkdir()
    monkeypatch.setenv(data.ENV_DIR, str(empty))
    msg = load_fails("FASHION_MNIST_DIR", data_dir=offline / "tfds")
    assert all(str(empty / n) in msg for n in data.UPSTREAM_FILES)
    assert_not_prepared(offline / "tfds")


@pytest.mark.parametrize(
    "name,damage,reason",
    [
        ("train-labels-idx1-ubyte.gz", "flip", "corrupted"),
        ("t10k-labels-idx1-ubyte.gz", "truncate", "truncated"),
        ("t10k-images-idx3-ubyte.gz", "truncate", "truncated"),
        ("t10k-labels-idx1-ubyte.gz", "swap", "different data"),
        ("train-labels-idx1-ubyte.gz", "gunzip", "not a gzip file"),
    ],
)
def test_damaged_file_is_an_error_naming_it(offline, copies, name, damage, reason):
    path = copies / name
    raw = path.read_bytes()
    if damage == "flip":
        i = len(raw) // 2
        raw = raw[:i] + bytes([raw[i] ^ 0x40]) + raw[i + 1 :]
    elif damage == "truncate":
        raw = raw[: len(raw) - 1000]
    elif damage == "swap":  # the other split's labels
        raw = (copies / "train-labels-idx1-ubyte.gz").read_bytes()
    elif damage == "gunzip":
        raw = gzip.decompress(raw)
    path.write_bytes(raw)
    msg = load_fails(reason, data_dir=offline / "tfds", manual_dir=copies)
    assert str(path) in msg
    assert_not_prepared(offline / "tfds")


def test_debian_header_is_restored(source_dir):
    expected = data.registered_checksums()
    for name in data.UPSTREAM_FILES:
        got = data.verify_file(source_dir / name, expected[name])
        assert len(got) == expected[name].size
        assert got.startswith(data.upstream_header(name))


def test_cache_is_verified(splits, tmp_path):
    version_dir = tmp_path / data.DATASET / "3.0.1"
    version_dir.mkdir(parents=True)
    (version_dir / "dataset_info.json").write_text('{"name": "fashion_mnist"}')
    (version_dir / "fashion_mnist-test.tfrecord-00000-of-00001").write_bytes(b"x" * 10)
    images, labels = splits["test"]
    data._write_cache(version_dir, "test", images, labels)
    got = data._read_cache(version_dir, "test")
    assert np.array_equal(got[0], images) and np.array_equal(got[1], labels)
    # a re-prepared tfds dataset makes the cache stale: it is rebuilt, not trusted
    (version_dir / "dataset_info.json").write_text('{"name": "fashion_mnist", "v": 2}')
    assert data._read_cache(version_dir, "test") is None
    data._write_cache(version_dir, "test", images, labels)
    # a damaged cache is an error naming it
    path = data._cache_path(version_dir, "test")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match="corrupted") as e:
        data._read_cache(version_dir, "test")
    assert str(path) in str(e.value)


@pytest.mark.slow
def test_prepare_from_local_files_in_a_fresh_data_dir(offline, copies, monkeypatch):
    """The whole first start-up offline (about 30 s): verify, stage, tfds prepare, cache."""
    data_dir = offline / "tfds"
    t = time.perf_counter()
    images, labels = data.load_split("train", data_dir=data_dir, manual_dir=copies)
    first = time.perf_counter() - t
    assert np.array_equal(pairs(images, labels), pairs(*read_idx(copies, "train")))
    manual = data_dir / "downloads" / "manual"
    expected = data.registered_checksums()
    for name in data.UPSTREAM_FILES:
        assert (manual / name).stat().st_size == expected[name].size

    def no_prepare(*args, **kwargs):
        raise AssertionError("prepared twice")

    monkeypatch.setattr(data, "_prepare_tfds", no_prepare)
    monkeypatch.setattr(data, "_read_tfds", no_prepare)
    t = time.perf_counter()
    again = data.load_split("train", data_dir=data_dir)
    test = data.load_split("test", data_dir=data_dir)
    later = time.perf_counter() - t
    assert np.array_equal(again[0], images) and len(test[1]) == 10_000
    print(f"first start-up {first:.1f} s, later {later:.2f} s")


def test_snapshot_round_trip_and_corruption(tmp_path, monkeypatch):
    """`export` writes the prepared splits for hosts without TensorFlow; reading it back gives
    the same arrays, and a changed array is refused."""
    path = tmp_path / "fm.npz"
    data.export_snapshot(path)
    monkeypatch.setenv(data.ENV_SNAPSHOT, str(path))
    for split in data.SPLITS:
        monkeypatch.delenv(data.ENV_SNAPSHOT)
        expected = data.load_split(split)
        monkeypatch.setenv(data.ENV_SNAPSHOT, str(path))
        got = data.load_split(split)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["test_labels"] = (arrays["test_labels"] + 1) % 10
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(data.DataError, match="does not match its recorded sha256"):
        data.read_snapshot(bad, "test")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(data.DataError, match="junk.npz"):
        data.read_snapshot(tmp_path / "junk.npz", "train")
