"""kill -9 during a checkpoint write: the previous checkpoint stays usable and `--resume auto` picks it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dsv3.train import checkpoint as ckpt
from dsv3.train.trainer import train
from tests.conftest import micro_run

# The trainer in a child process whose second checkpoint save stalls after the model and trainer files
# are written and before the manifest: the kill lands inside the write.
STALLING = Path(__file__).with_name("stalling_save.py")


def test_kill_during_checkpoint_write_keeps_previous(tmp_path, corpus_shards):
    train_dir, valid_dir = corpus_shards
    out = tmp_path / "run"
    cfg = micro_run(out, train_dir, valid_dir, "train.sample_tokens=0")
    cfg_file = tmp_path / "run.json"  # JSON is YAML
    cfg_file.write_text(cfg.model_dump_json())
    marker = tmp_path / "stalled"
    child = subprocess.Popen(
        [sys.executable, str(STALLING), str(marker), "train", "--config", str(cfg_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never reached the second checkpoint"
            time.sleep(0.05)
        partial = Path(marker.read_text())
        assert partial.exists() and (partial / "model.safetensors").exists()  # mid-write for real
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_000006"]
    assert ckpt.resolve_resume("auto", out) == out / "step_000006"
    ckpt.load_model(out / "step_000006", cfg.model)  # usable: verified, loads

    result = train(cfg, resume="auto")
    assert result.step == 12
    assert not partial.exists()  # the cut-off save was cleaned up
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_000006", "step_000012"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 13))  # one uninterrupted log, no step twice
