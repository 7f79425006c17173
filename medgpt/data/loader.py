"""Token windows from prepared shards, memory-mapped, for one rank of a data-parallel run.

The split is one stream of tokens (its shards concatenated). An epoch cuts it into
non-overlapping windows of ``block_size + 1`` tokens starting at ``offset + i * block_size``
(x is the first ``block_size`` tokens, y the same shifted by one), shuffles the window order
with a generator seeded by ``(seed, epoch)``, and deals the windows round-robin to the ranks:
rank r of W takes positions r, r + W, ... so ranks never share a window, and every rank gets
the same number of batches (the remainder is dropped) so collective ops stay in step.

The loader's state is ``(epoch, batch)`` on this rank; saving it with a checkpoint and
restoring it gives exactly the batches that would have come next: no repeats, no skips.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgpt.data.prepare import FORMAT, FORMAT_VERSION, MANIFEST, SPLITS, TOKEN_DTYPE
from medgpt.errors import DataError


class TokenShards:
    """The shards of one split of a prepared dataset, memory-mapped (nothing read up front)."""

    def __init__(self, data_dir: str | Path, split: str) -> None:
        self.data_dir = Path(data_dir)
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r} (allowed: {', '.join(SPLITS)})")
        self.manifest = read_manifest(self.data_dir)
        entry = self.manifest["splits"][split]
        self.maps: list[np.memmap] = []
        for shard in entry["shards"]:
            path = self.data_dir / shard["file"]
            if not path.is_file():
                raise DataError(f"{path}: shard listed in {MANIFEST} is missing")
            size = path.stat().st_size
            if size != shard["tokens"] * TOKEN_DTYPE.itemsize:
                raise DataError(
                    f"{path}: {size} bytes, the manifest says {shard['tokens']} tokens "
                    f"({shard['tokens'] * TOKEN_DTYPE.itemsize} bytes); the dataset is damaged, "
                    "prepare it again"
                )
            if shard["tokens"]:
                self.maps.append(np.memmap(path, dtype=TOKEN_DTYPE, mode="r"))
        self.starts = [0]
        for m in self.maps:
            self.starts.append(self.starts[-1] + len(m))
        self.n_tokens = self.starts[-1]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the concatenated stream."""
        if start < 0 or start + length > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside 0..{self.n_tokens}")
        out = np.empty(length, dtype=np.int64)
        i = bisect.bisect_right(self.starts, start) - 1
        filled = 0
        while filled < length:
            local = start + filled - self.starts[i]
            take = min(length - filled, len(self.maps[i]) - local)
            out[filled : filled + take] = self.maps[i][local : local + take]
            filled += take
            i += 1
        return out


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{data_dir}: no {MANIFEST} (not a prepared dataset, or its preparation did not "
            "finish); run `medgpt prepare` first"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a medgpt dataset manifest (format != {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: dataset format version {manifest.get('format_version')!r}, this medgpt "
            f"reads version {FORMAT_VERSION}; prepare the data again with this version"
        )
    return manifest


class WindowLoader:
    """Batches of (x, y) windows for one rank; iterate forever, epoch after epoch."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        block_size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if block_size < 1 or batch_size < 1:
            raise ValueError("block_size and batch_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.shards = TokenShards(data_dir, split)
        self.split, self.block_size, self.batch_size = split, block_size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.n_windows = (self.shards.n_tokens - 1) // block_size
        self.batches_per_epoch = self.n_windows // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{data_dir} split {split!r} has {self.shards.n_tokens} tokens: not enough for "
                f"one batch of {batch_size} x {block_size + 1} tokens on each of {world_size} "
                "rank(s); use more data or a smaller batch/block size"
            )
        self.epoch = 0
        self.batch = 0  # next batch of this epoch on this rank
        self._epoch_windows: np.ndarray | None = None

    @property
    def tokens_per_epoch(self) -> int:
        """Tokens (x) this rank sees per epoch."""
        return self.batches_per_epoch * self.batch_size * self.block_size

    def _windows(self) -> np.ndarray:
        """Start offsets of this rank's windows for the current epoch, in order."""
        if self._epoch_windows is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            # Shift the grid each epoch so window boundaries (and thus contexts) vary, keeping
            # the last window inside the stream.
            spare = self.shards.n_tokens - 1 - self.n_windows * self.block_size
            offset = int(rng.integers(0, spare + 1)) if self.epoch > 0 else 0
            order = rng.permutation(self.n_windows)
            used = self.batches_per_epoch * self.batch_size * self.world_size
            mine = order[:used][self.rank :: self.world_size]
            self._epoch_windows = offset + mine.astype(np.int64) * self.block_size
        return self._epoch_windows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch == self.batches_per_epoch:
            self.epoch += 1
            self.batch = 0
            self._epoch_windows = None
        starts = self._windows()[self.batch * self.batch_size : (self.batch + 1) * self.batch_size]
        rows = np.stack([self.shards.read(int(s), self.block_size + 1) for s in starts])
        self.batch += 1
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def __iter__(self) -> WindowLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.shards.manifest["content_hash"],
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "world_size": self.world_size,
            "block_size": self.block_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("dataset") != self.shards.manifest["content_hash"]:
            raise DataError(
                "loader state belongs to another dataset (content hash "
                f"{str(state.get('dataset'))[:12]} != {self.shards.manifest['content_hash'][:12]}); "
                "resume with the data the run started with"
            )
        # The position is the same on every rank (they advance in lockstep), so rank 0's saved
        # state restores any rank; what must match is everything that shapes the sequence.
        for key in ("seed", "world_size", "block_size", "batch_size"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"loader state was saved with {key}={state.get(key)}, this loader has "
                    f"{key}={getattr(self, key)}; resume with the same data settings"
                )
        if not 0 <= state["batch"] <= self.batches_per_epoch:
            raise DataError(
                f"loader state batch {state['batch']} is outside this dataset's "
                f"{self.batches_per_epoch} batches per epoch (was the dataset changed?)"
            )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._epoch_windows = None
