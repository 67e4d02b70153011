"""Token shards in, fixed-length training windows out: packing, a resumable sampler, a validation split.

A Megatron `.bin` is every document's tokens back to back (each ending in EOS), so packing is a
view: window i of a shard is tokens [i·L, i·L + L + 1) — L inputs and the L next-token labels —
and documents flow across window edges separated by their EOS. Nothing is copied or padded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsv3.config import ConfigError, DataConfig

__all__ = ["PackedWindows", "EpochSampler", "TrainData", "find_shards", "open_token_streams", "build_data"]

log = logging.getLogger(__name__)


def find_shards(entries: list[str], key: str) -> list[Path]:
    """Expand shard prefixes and directories (every `*.idx` inside) into prefixes; missing ones raise."""
    prefixes: list[Path] = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            found = sorted({p.with_suffix("") for p in (*path.glob("*.idx"), *path.glob("*.bin"))})
            if not found:
                raise ConfigError(f"data.{key}: {entry}: directory holds no .idx/.bin shards")
            prefixes.extend(found)
        else:
            prefixes.append(path.with_suffix("") if path.suffix in (".bin", ".idx") else path)
    for prefix in prefixes:
        for suffix in (".idx", ".bin"):
            if not prefix.with_name(prefix.name + suffix).is_file():
                raise ConfigError(f"data.{key}: missing shard file {prefix}{suffix}")
    return prefixes


def open_token_streams(prefixes: list[Path]) -> list[np.ndarray]:
    """Each shard's tokens as one memory-mapped 1-D array (the data pipeline's reader does the format)."""
    from dsv3.data.shards import IndexedDataset, ShardError

    streams = []
    for prefix in prefixes:
        try:
            streams.append(IndexedDataset(prefix).tokens)
        except ShardError as e:
            raise ConfigError(str(e)) from None
        except OSError as e:
            raise ConfigError(f"{prefix}: unreadable shard: {e}") from None
    return streams


class PackedWindows:
    """Windows of `seq_len + 1` tokens over several token streams, addressed by one global index."""

    def __init__(self, streams: list[np.ndarray], seq_len: int, limit: tuple[int, int] | None = None) -> None:
        self.streams = streams
        self.seq_len = seq_len
        counts = np.array([max((len(s) - 1) // seq_len, 0) for s in streams], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        lo, hi = limit if limit is not None else (0, int(self._starts[-1]))
        self._lo, self._hi = lo, hi

    def __len__(self) -> int:
        return self._hi - self._lo

    def subset(self, lo: int, hi: int) -> PackedWindows:
        """Windows [lo, hi) of this set, sharing the memory maps."""
        return PackedWindows(self.streams, self.seq_len, (self._lo + lo, self._lo + hi))

    def __getitem__(self, i: int) -> np.ndarray:
        g = self._lo + i
        shard = int(np.searchsorted(self._starts, g, side="right")) - 1
        start = (g - int(self._starts[shard])) * self.seq_len
        return self.streams[shard][start : start + self.seq_len + 1]

    def batch(self, indices: np.ndarray | list[int]) -> torch.Tensor:
        """(len(indices), seq_len + 1) int64 token ids."""
        return torch.from_numpy(np.stack([self[int(i)] for i in indices]).astype(np.int64))

    def token_counts(self, vocab_size: int, max_tokens: int = 200_000_000) -> np.ndarray:
        """Token frequencies over the windows' inputs (the first `max_tokens`, to bound the cost)."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        budget = max_tokens
        first, last = self._lo, self._hi
        for shard, stream in enumerate(self.streams):
            a = max(first, int(self._starts[shard])) - int(self._starts[shard])
            b = min(last, int(self._starts[shard + 1])) - int(self._starts[shard])
            if b <= a or budget <= 0:
                continue
            tokens = np.asarray(stream[a * self.seq_len : min(b * self.seq_len, a * self.seq_len + budget)])
            budget -= len(tokens)
            if len(tokens) and int(tokens.max()) >= vocab_size:
                raise ConfigError(f"shard token id {int(tokens.max())} >= model vocab_size {vocab_size}")
            counts += np.bincount(tokens, minlength=vocab_size)
        return counts


@dataclass
class EpochSampler:
    """Shuffled window order, a fresh permutation per epoch; its position is the whole state.

    The permutation of epoch e is drawn from a generator seeded with (seed, e), so a resumed run
    rebuilds it exactly from `epoch` and `position` alone.
    """

    n: int
    seed: int
    epoch: int = 0
    position: int = 0

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ConfigError("training data holds no complete window: add tokens or shorten seq_len")
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def take(self, k: int) -> np.ndarray:
        out = []
        while k:
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            m = min(k, self.n - self.position)
            out.append(self._order[self.position : self.position + m])
            self.position += m
            k -= m
        return np.concatenate(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ConfigError(
                f"the checkpoint's sampler ran over {state['n']} windows, the data now gives {self.n} "
                "(different shards or seq_len)"
            )
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


@dataclass
class TrainData:
    """The windows to train on, the windows to validate on, and the sampler over the former."""

    train: PackedWindows
    valid: PackedWindows
    sampler: EpochSampler

    def next_batch(self, batch_size: int) -> torch.Tensor:
        return self.train.batch(self.sampler.take(batch_size))

    def next_share(self, global_batch: int, rank: int, ranks: int) -> torch.Tensor:
        """Data-parallel rank `rank`'s contiguous share of the next `global_batch` windows: every rank
        draws the same indices and reads only its own (global_batch / ranks, seq_len + 1)."""
        indices = self.sampler.take(global_batch)
        per_rank = global_batch // ranks
        return self.train.batch(indices[rank * per_rank : (rank + 1) * per_rank])

    def valid_batches(self, batch_size: int, n_batches: int) -> list[torch.Tensor]:
        """The first n_batches·batch_size validation windows, in order: the same set every evaluation."""
        n = min(len(self.valid), batch_size * n_batches)
        return [self.valid.batch(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def build_data(cfg: DataConfig, seq_len: int, seed: int) -> TrainData:
    """Open the shards; hold out the tail of the training windows when no validation shards are given."""
    if not cfg.train:
        raise ConfigError("data.train: no training shards given")
    train = PackedWindows(open_token_streams(find_shards(cfg.train, "train")), seq_len)
    if cfg.valid:
        valid = PackedWindows(open_token_streams(find_shards(cfg.valid, "valid")), seq_len)
    else:
        n_valid = max(1, int(len(train) * cfg.valid_fraction))
        if n_valid >= len(train):
            raise ConfigError(f"data.train: {len(train)} windows of {seq_len + 1} tokens, too few to split")
        train, valid = train.subset(0, len(train) - n_valid), train.subset(len(train) - n_valid, len(train))
    if len(valid) == 0:
        raise ConfigError(f"data.valid: no complete window of {seq_len + 1} tokens in the validation shards")
    log.debug("data: %d train, %d valid windows of %d tokens", len(train), len(valid), seq_len)
    return TrainData(train=train, valid=valid, sampler=EpochSampler(len(train), seed))
