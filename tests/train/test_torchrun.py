"""`torchrun … -m dsv3 train` end to end on CPU: the command, a failing rank, and kill -9 mid-save."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from dsv3.checkpoints import is_sharded, list_checkpoints
from dsv3.cli import main
from dsv3.model.hf import load_hf
from dsv3.train.trainer import train
from tests.conftest import micro_run

SRC = Path(__file__).parents[2] / "src"
ROOT = Path(__file__).parents[2]


def _torchrun(n: int, *argv: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}:{ROOT}", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), *argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def _config_file(tmp_path: Path, cfg) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    return str(path)


def test_torchrun_trains_with_fsdp_prints_once_and_writes_a_sharded_checkpoint(tmp_path, corpus_shards):
    cfg = micro_run(tmp_path / "run", *corpus_shards, "train.steps=6", "train.save_every=3",
                    "parallel.gpus=2", "parallel.dp_shard=2", "train.async_checkpoint=true")
    proc = _torchrun(2, "-m", "dsv3", "train", "--config", _config_file(tmp_path, cfg))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    # rank 0 alone prints: each step's line once, the summary once
    assert sum("step 6/6" in line for line in out.splitlines()) == 1, out[-3000:]
    assert out.count("last checkpoint") == 1
    last = list_checkpoints(tmp_path / "run")[-1]
    assert last.name == "step_000006" and is_sharded(last)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_000003", "step_000006"]

    # the sharded checkpoint converts to the Hugging Face layout, tensor for tensor
    assert main(["convert", "--to-hf", str(tmp_path / "run"), "--to", str(tmp_path / "hf")]) == 0
    assert not is_sharded(tmp_path / "hf") and (tmp_path / "hf" / "model.safetensors").is_file()
    sharded, converted = load_hf(last).state_dict(), load_hf(tmp_path / "hf").state_dict()
    assert sharded.keys() == converted.keys()
    assert all(torch.equal(sharded[k], converted[k]) for k in sharded)


# Rank 1 fails at step 3, in the middle of the run, while rank 0 waits for it in a collective.
FAILING = r"""
import sys
from dsv3.cli import main
from dsv3.train.trainer import Trainer
import os

step = Trainer._queue_step

def failing_step(self):
    if os.environ["RANK"] == "1" and self.step == 2:
        raise RuntimeError("rank 1 broke on purpose at step 3")
    return step(self)

Trainer._queue_step = failing_step
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_that_raises_ends_the_job_with_its_message(tmp_path, corpus_shards):
    cfg = micro_run(tmp_path / "run", *corpus_shards, "parallel.gpus=2", "parallel.dp_shard=2")
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    t0 = time.monotonic()
    proc = _torchrun(2, str(script), "train", "--config", _config_file(tmp_path, cfg))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "rank 1 broke on purpose at step 3" in out
    assert time.monotonic() - t0 < 120  # torchrun ended the waiting rank: no hang until a timeout


# Both ranks write their shards of the step-12 checkpoint; rank 0 then stalls before the manifest.
STALLING = Path(__file__).with_name("stalling_save.py")


def test_kill_during_a_sharded_save_keeps_the_previous_checkpoint(tmp_path, corpus_shards):
    out = tmp_path / "run"
    cfg = micro_run(out, *corpus_shards, "parallel.gpus=2", "parallel.dp_shard=2", "train.sample_tokens=0")
    marker = tmp_path / "stalled"
    proc = _torchrun(2, str(STALLING), str(marker), "train", "--config", _config_file(tmp_path, cfg),
                     start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the job never reached the second checkpoint"
            time.sleep(0.1)
        partial = Path(marker.read_text())
        assert (partial / "dcp" / ".metadata").is_file()  # every shard written, the manifest not yet
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()
    assert [p.name for p in list_checkpoints(out)] == ["step_000006"]

    # One process resumes the sharded checkpoint of two and finishes the run.
    result = train(micro_run(out, *corpus_shards, "train.sample_tokens=0"), resume="auto")
    assert result.step == 12 and not partial.exists()
    assert [p.name for p in list_checkpoints(out)] == ["step_000006", "step_000012"]
    assert not is_sharded(out / "step_000012")  # one process writes the Hugging Face layout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 13))
