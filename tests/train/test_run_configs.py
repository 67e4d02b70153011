"""The shipped run configs load, and the demo run trains on exactly what the demo data stage writes."""

from __future__ import annotations

from pathlib import Path

from dsv3.config import load_run_config
from dsv3.data.pipeline_config import load_pipeline_config

CONFIGS = Path(__file__).parents[2] / "configs"


def test_demo_run_reads_the_demo_pipeline_outputs():
    run = load_run_config(CONFIGS / "train" / "demo.yaml")
    data = load_pipeline_config(CONFIGS / "data" / "demo.yaml")
    shards = Path(data.output) / data.tokenize.output
    assert [Path(p) for p in run.data.train] == [shards / "train"]
    assert [Path(p) for p in run.data.valid] == [shards / "valid"]
    assert Path(run.data.tokenizer) == data.tokenize.tokenizer_file
    assert run.model.vocab_size == data.tokenize.train.vocab_size  # the override of the tiny preset


def test_demo_run_is_the_tiny_model_with_every_feature_on():
    run = load_run_config(CONFIGS / "train" / "demo.yaml")
    tiny = load_run_config("tiny").model
    assert run.model.model_dump(exclude={"vocab_size"}) == tiny.model_dump(exclude={"vocab_size"})
    assert run.model.num_nextn_predict_layers > 0 and run.train.mtp_lambda > 0
    assert run.model.n_group > 1 and run.model.first_k_dense_replace > 0 and run.model.q_lora_rank
    # the trainer's balance defaults (docs/training.md), no per-run workaround
    assert run.train.bias_update_speed == "auto" and run.train.balance_alpha == 1e-4
    assert run.train.steps % run.train.eval_every == 0  # the last step is evaluated and saved
    assert run.train.save_every % run.train.eval_every == 0  # every checkpoint has a validation loss
