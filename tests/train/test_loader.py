"""Packing covers the token stream exactly; the sampler is deterministic and resumes mid-epoch."""

import numpy as np
import pytest

from dsv3.config import ConfigError
from dsv3.train.loader import EpochSampler, PackedWindows, find_shards


def test_windows_tile_the_stream_with_one_token_overlap():
    a, b = np.arange(0, 23, dtype=np.uint16), np.arange(100, 110, dtype=np.uint16)
    w = PackedWindows([a, b], seq_len=4)
    assert len(w) == (23 - 1) // 4 + (10 - 1) // 4 == 7
    assert w[0].tolist() == [0, 1, 2, 3, 4]
    assert w[1].tolist() == [4, 5, 6, 7, 8]  # the last label of a window is the next window's first input
    assert w[5].tolist() == [100, 101, 102, 103, 104]  # windows never straddle two shards
    batch = w.batch([6, 0])
    assert batch.shape == (2, 5) and batch.dtype.is_floating_point is False
    assert batch[0].tolist() == [104, 105, 106, 107, 108]


def test_subset_and_token_counts():
    stream = np.array([0, 1, 1, 2, 2, 2, 3, 3, 3], dtype=np.uint16)
    w = PackedWindows([stream], seq_len=2)
    assert len(w) == 4
    tail = w.subset(3, 4)
    assert len(tail) == 1 and tail[0].tolist() == [3, 3, 3]
    assert w.token_counts(5).tolist() == [1, 2, 3, 2, 0]  # inputs of all windows: stream[:8]
    with pytest.raises(ConfigError, match="vocab_size 3"):
        w.token_counts(3)


def test_sampler_covers_each_epoch_once_and_is_seeded():
    s = EpochSampler(10, seed=7)
    first = s.take(10)
    assert sorted(first.tolist()) == list(range(10))
    second = s.take(10)
    assert sorted(second.tolist()) == list(range(10)) and s.epoch == 1
    assert first.tolist() != second.tolist()
    assert EpochSampler(10, seed=7).take(10).tolist() == first.tolist()
    assert EpochSampler(10, seed=8).take(10).tolist() != first.tolist()


def test_sampler_resumes_exactly_from_its_state():
    full = EpochSampler(13, seed=3)
    expected = [full.take(4).tolist() for _ in range(9)]
    s = EpochSampler(13, seed=3)
    got = [s.take(4).tolist() for _ in range(5)]
    resumed = EpochSampler(13, seed=0)
    resumed.load_state_dict(s.state_dict())
    got += [resumed.take(4).tolist() for _ in range(4)]
    assert got == expected


def test_sampler_refuses_state_of_other_data():
    s = EpochSampler(13, seed=3)
    with pytest.raises(ConfigError, match="13 windows"):
        EpochSampler(12, seed=3).load_state_dict(s.state_dict())
    with pytest.raises(ConfigError, match="no complete window"):
        EpochSampler(0, seed=3)


def test_missing_shards_name_the_file(tmp_path):
    (tmp_path / "a.idx").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"data.train: missing shard file .*a\.bin"):
        find_shards([str(tmp_path / "a")], "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="data.valid: .*no .idx/.bin shards"):
        find_shards([str(tmp_path / "empty")], "valid")
    with pytest.raises(ConfigError, match=r"missing shard file .*nowhere\.idx"):
        find_shards([str(tmp_path / "nowhere")], "train")
    (tmp_path / "a.bin").write_bytes(b"")
    assert find_shards([str(tmp_path)], "train") == [tmp_path / "a"]
    assert find_shards([str(tmp_path / "a.bin")], "train") == [tmp_path / "a"]
