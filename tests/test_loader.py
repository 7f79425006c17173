"""Token windows from prepared shards (medgpt.data.loader): shapes, rank sharding, determinism,
resumable state, memory mapping, and clear errors for damaged datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medgpt.data.loader import TokenShards, WindowLoader
from medgpt.data.prepare import PrepareConfig, prepare
from medgpt.errors import DataError

BLOCK = 16
BATCH = 4
SHARD_TOKENS = 100  # not a multiple of BLOCK: many windows straddle two shards

WORDS = [
    *("fever", "cough", "asthma", "insulin", "renal", "cardiac", "lesion", "biopsy", "dose"),
    *("tablet", "nausea", "migraine", "stroke", "sepsis", "anemia", "ulcer", "rash", "edema"),
    *("angina", "tremor"),
]


def make_dataset(folder: Path, n_docs: int = 300, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    src = folder / "notes.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    with src.open("w", encoding="utf-8") as f:
        for i in range(n_docs):
            words = " ".join(rng.choice(WORDS, size=10))
            f.write(json.dumps({"text": f"case {i}: {words} {rng.integers(10**6)}"}) + "\n")
    out = folder / "data"
    prepare(
        PrepareConfig(
            sources=[str(src)], out=str(out), shard_tokens=SHARD_TOKENS, val_fraction=0.2
        ),
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("loader"))


@pytest.fixture(scope="module")
def other_data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("loader-other"), seed=1)


@pytest.fixture
def copy_dir(data_dir, tmp_path) -> Path:
    """A private copy of the dataset to damage."""
    return Path(shutil.copytree(data_dir, tmp_path / "data"))


def raw_stream(data_dir: Path, split: str = "train") -> np.ndarray:
    manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
    files = [data_dir / s["file"] for s in manifest["splits"][split]["shards"]]
    return np.concatenate([np.fromfile(f, dtype="<u2") for f in files]).astype(np.int64)


class Locator:
    """Finds where a window of BLOCK + 1 tokens starts in the raw stream."""

    def __init__(self, raw: np.ndarray) -> None:
        self.raw = raw
        self.where: dict[bytes, list[int]] = {}
        for p in range(len(raw) - BLOCK):
            self.where.setdefault(raw[p : p + BLOCK + 1].tobytes(), []).append(p)

    def start(self, x: torch.Tensor, y: torch.Tensor) -> int:
        row = torch.cat([x, y[-1:]]).numpy().astype(np.int64)
        found = self.where.get(row.tobytes(), [])
        assert len(found) == 1, f"window found at {found} in the raw stream"
        return found[0]


@pytest.fixture(scope="module")
def locator(data_dir) -> Locator:
    return Locator(raw_stream(data_dir))


def take(loader: WindowLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def starts_of(batches, locator: Locator) -> list[int]:
    return [locator.start(x[i], y[i]) for x, y in batches for i in range(x.shape[0])]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )


# --- windows -----------------------------------------------------------------------------------


def test_shapes_dtype_and_shift(data_dir, locator):
    loader = WindowLoader(data_dir, "train", block_size=BLOCK, batch_size=BATCH, seed=0)
    raw = locator.raw
    for x, y in take(loader, 10):
        assert x.shape == y.shape == (BATCH, BLOCK)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for i in range(BATCH):
            s = locator.start(x[i], y[i])
            assert s % BLOCK == 0  # epoch 0 uses the unshifted grid
            assert x[i].tolist() == raw[s : s + BLOCK].tolist()
            assert y[i].tolist() == raw[s + 1 : s + BLOCK + 1].tolist()


def test_windows_across_shard_boundaries(data_dir, locator):
    loader = WindowLoader(data_dir, "train", block_size=BLOCK, batch_size=BATCH, seed=0)
    manifest = loader.shards.manifest
    assert len(manifest["splits"]["train"]["shards"]) > 10
    batches = take(loader, loader.batches_per_epoch)
    starts = starts_of(batches, locator)
    crossing = [s for s in starts if s // SHARD_TOKENS != (s + BLOCK) // SHARD_TOKENS]
    assert len(crossing) > 10
    # TokenShards.read across boundaries equals the concatenated files
    shards = TokenShards(data_dir, "train")
    for start in (95, 99, 100, 195, 0, shards.n_tokens - 7):
        assert shards.read(start, 7).tolist() == locator.raw[start : start + 7].tolist()
    assert shards.read(90, 250).tolist() == locator.raw[90:340].tolist()
    with pytest.raises(IndexError):
        shards.read(shards.n_tokens - 3, 4)


def test_epoch_covers_distinct_windows(data_dir, locator):
    loader = WindowLoader(data_dir, "train", block_size=BLOCK, batch_size=BATCH, seed=0)
    n_tokens = loader.shards.n_tokens
    assert loader.n_windows == (n_tokens - 1) // BLOCK
    assert loader.batches_per_epoch == loader.n_windows // BATCH
    assert loader.tokens_per_epoch == loader.batches_per_epoch * BATCH * BLOCK
    starts = starts_of(take(loader, loader.batches_per_epoch), locator)
    assert len(starts) == len(set(starts)) == loader.batches_per_epoch * BATCH
    assert set(starts) <= {k * BLOCK for k in range(loader.n_windows)}
    assert starts != sorted(starts)  # shuffled


# --- ranks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_see_disjoint_windows(data_dir, locator, world_size):
    loaders = [
        WindowLoader(data_dir, "train", BLOCK, BATCH, rank=r, world_size=world_size, seed=5)
        for r in range(world_size)
    ]
    per_epoch = {lo.batches_per_epoch for lo in loaders}
    assert len(per_epoch) == 1
    (bpe,) = per_epoch
    assert bpe == loaders[0].n_windows // (world_size * BATCH)
    for _epoch in range(2):
        all_starts = []
        for lo in loaders:
            all_starts += starts_of(take(lo, bpe), locator)
        assert len(all_starts) == world_size * bpe * BATCH
        assert len(set(all_starts)) == len(all_starts)
    assert {lo.epoch for lo in loaders} == {1}


def test_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        WindowLoader("unused", "train", BLOCK, BATCH, rank=2, world_size=2)


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_same_batches_other_seed_other_order(data_dir, locator):
    a = WindowLoader(data_dir, "train", BLOCK, BATCH, seed=3)
    b = WindowLoader(data_dir, "train", BLOCK, BATCH, seed=3)
    c = WindowLoader(data_dir, "train", BLOCK, BATCH, seed=4)
    n = a.batches_per_epoch + 5
    ba, bb, bc = take(a, n), take(b, n), take(c, n)
    assert same_batches(ba, bb)
    assert not same_batches(ba, bc)
    bpe = a.batches_per_epoch
    starts_a, starts_c = starts_of(ba[:bpe], locator), starts_of(bc[:bpe], locator)
    # Both walk the same epoch-0 grid, in another order.
    assert {s % BLOCK for s in starts_a + starts_c} == {0}
    assert starts_a != starts_c
    assert len(set(starts_a) & set(starts_c)) > len(starts_a) // 2


def test_epochs_differ(data_dir, locator):
    loader = WindowLoader(data_dir, "train", BLOCK, BATCH, seed=0)
    bpe = loader.batches_per_epoch
    spare = loader.shards.n_tokens - 1 - loader.n_windows * BLOCK
    assert spare > 0, "the test dataset should leave room to shift the window grid"
    epochs = [starts_of(take(loader, bpe), locator) for _ in range(6)]
    assert loader.epoch == 5
    offsets = []
    for starts in epochs:
        assert len(starts) == len(set(starts))  # no window repeats within an epoch
        assert len({s % BLOCK for s in starts}) == 1  # one grid per epoch
        offsets.append(starts[0] % BLOCK)
        assert max(starts) + BLOCK + 1 <= loader.shards.n_tokens
    assert offsets[0] == 0
    assert any(o != 0 for o in offsets[1:]), offsets  # later epochs shift the grid
    for starts, offset in zip(epochs[1:], offsets[1:], strict=True):
        assert starts != epochs[0]  # a new permutation
        if offset != 0:
            assert not set(starts) & set(epochs[0])  # shifted: every window is new


# --- state -------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 5, "epoch_end"])
def test_save_and_restore_state(data_dir, k):
    a = WindowLoader(data_dir, "train", BLOCK, BATCH, rank=1, world_size=2, seed=9)
    bpe = a.batches_per_epoch
    k = bpe if k == "epoch_end" else k
    take(a, k)
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON checkpoint
    m = bpe + 3  # crosses an epoch boundary
    expected = take(a, m)

    b = WindowLoader(data_dir, "train", BLOCK, BATCH, rank=1, world_size=2, seed=9)
    take(b, 2)  # a loader in another position is moved, not appended to
    b.load_state_dict(state)
    assert same_batches(take(b, m), expected)
    assert b.state_dict() == a.state_dict()


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"seed": 10}, "seed"),
        ({"world_size": 4, "rank": 1}, "world_size"),
    ],
)
def test_restore_with_other_settings_is_refused(data_dir, change, key):
    settings = {"rank": 1, "world_size": 2, "seed": 9}
    a = WindowLoader(data_dir, "train", BLOCK, BATCH, **settings)
    take(a, 3)
    other = WindowLoader(data_dir, "train", BLOCK, BATCH, **{**settings, **change})
    with pytest.raises(DataError, match=f"saved with {key}="):
        other.load_state_dict(a.state_dict())
    assert other.state_dict()["batch"] == 0


def test_rank0_state_restores_every_rank(data_dir):
    # Training saves rank 0's loader state once; every rank resumes from it.
    r0 = WindowLoader(data_dir, "train", BLOCK, BATCH, rank=0, world_size=2, seed=9)
    r1 = WindowLoader(data_dir, "train", BLOCK, BATCH, rank=1, world_size=2, seed=9)
    take(r0, 4)
    take(r1, 4)
    state = r0.state_dict()
    expected = take(r1, 3)
    fresh = WindowLoader(data_dir, "train", BLOCK, BATCH, rank=1, world_size=2, seed=9)
    fresh.load_state_dict(state)
    assert same_batches(take(fresh, 3), expected)


def test_restore_on_another_dataset_is_refused(data_dir, other_data_dir):
    a = WindowLoader(data_dir, "train", BLOCK, BATCH)
    take(a, 3)
    other = WindowLoader(other_data_dir, "train", BLOCK, BATCH)
    with pytest.raises(DataError, match="another dataset"):
        other.load_state_dict(a.state_dict())


@pytest.mark.parametrize("change", [{"batch_size": 2 * BATCH}, {"block_size": 2 * BLOCK}])
def test_restore_with_other_window_shape_is_refused(data_dir, change):
    # The state is a batch index: with another batch or block size the same index points at
    # other windows, so resuming would silently repeat and skip data.
    a = WindowLoader(data_dir, "train", block_size=BLOCK, batch_size=BATCH, seed=9)
    take(a, 3)
    other = WindowLoader(
        data_dir, "train", **{"block_size": BLOCK, "batch_size": BATCH, **change}, seed=9
    )
    with pytest.raises(DataError):
        other.load_state_dict(a.state_dict())


def test_restore_batch_out_of_range(data_dir):
    a = WindowLoader(data_dir, "train", BLOCK, BATCH)
    state = {**a.state_dict(), "batch": a.batches_per_epoch + 1}
    with pytest.raises(DataError, match="outside"):
        a.load_state_dict(state)


# --- memory mapping ----------------------------------------------------------------------------


def test_shards_are_memory_mapped(data_dir):
    shards = TokenShards(data_dir, "val")
    listed = shards.manifest["splits"]["val"]["shards"]
    assert len(shards.maps) == len(listed) > 1
    assert all(isinstance(m, np.memmap) for m in shards.maps)
    assert all(m.dtype == np.dtype("<u2") for m in shards.maps)
    assert (
        shards.n_tokens
        == shards.manifest["splits"]["val"]["tokens"]
        == sum(len(m) for m in shards.maps)
    )


# --- bad input ---------------------------------------------------------------------------------


def test_folder_without_manifest(tmp_path):
    with pytest.raises(DataError, match="medgpt prepare") as e:
        WindowLoader(tmp_path, "train", BLOCK, BATCH)
    assert "manifest.json" in str(e.value)
    assert str(tmp_path) in str(e.value)


def test_manifest_not_json(copy_dir):
    (copy_dir / "manifest.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON") as e:
        TokenShards(copy_dir, "train")
    assert str(copy_dir / "manifest.json") in str(e.value)


@pytest.mark.parametrize("content", [{"format": "something-else"}, [], "medgpt-token-shards"])
def test_manifest_other_format(copy_dir, content):
    manifest = json.loads((copy_dir / "manifest.json").read_text(encoding="utf-8"))
    if isinstance(content, dict):
        manifest.update(content)
    else:
        manifest = content
    (copy_dir / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(DataError, match="not a medgpt dataset manifest") as e:
        TokenShards(copy_dir, "train")
    assert str(copy_dir / "manifest.json") in str(e.value)


def test_manifest_newer_format_version(copy_dir):
    # A version-3 layout must not be read as if it were version 2.
    manifest = json.loads((copy_dir / "manifest.json").read_text(encoding="utf-8"))
    manifest["format_version"] = 3
    (copy_dir / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(DataError, match="version"):
        TokenShards(copy_dir, "train")


def test_missing_shard(copy_dir):
    (copy_dir / "train_0003.bin").unlink()
    with pytest.raises(DataError, match="missing") as e:
        WindowLoader(copy_dir, "train", BLOCK, BATCH)
    assert str(copy_dir / "train_0003.bin") in str(e.value)


def test_truncated_shard(copy_dir):
    shard = copy_dir / "train_0002.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(DataError) as e:
        WindowLoader(copy_dir, "train", BLOCK, BATCH)
    msg = str(e.value)
    assert str(shard) in msg
    assert f"{2 * SHARD_TOKENS - 6} bytes" in msg
    assert f"{SHARD_TOKENS} tokens" in msg


def test_dataset_too_small_for_one_batch(data_dir):
    n = TokenShards(data_dir, "val").n_tokens
    with pytest.raises(DataError) as e:
        WindowLoader(data_dir, "val", block_size=1024, batch_size=64)
    msg = str(e.value)
    assert f"{n} tokens" in msg
    assert "64 x 1025" in msg
    assert "'val'" in msg


def test_too_small_for_all_ranks(data_dir):
    n_windows = (TokenShards(data_dir, "val").n_tokens - 1) // BLOCK
    world = n_windows // BATCH + 1
    with pytest.raises(DataError, match=f"each of {world} rank"):
        WindowLoader(data_dir, "val", BLOCK, BATCH, rank=0, world_size=world)


def test_unknown_split(data_dir):
    with pytest.raises(DataError, match="unknown split 'test'") as e:
        WindowLoader(data_dir, "test", BLOCK, BATCH)
    assert "train, val" in str(e.value)
