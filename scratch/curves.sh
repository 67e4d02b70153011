#!/usr/bin/env bash
# Three GPU reference runs of `small` at once on one GPU: float32 weights (the default), bf16 weights
# with float32 masters, and bf16 weights + bf16 moments; same data, seed and schedule.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv
common=(--config small --set model.vocab_size=8192
  --set 'data.train=[data/demo/shards/train]' --set 'data.valid=[data/demo/shards/valid]'
  --set data.tokenizer=data/demo/tokenizer/tokenizer.json --set train.steps=${STEPS_N:-1000}
  --set train.global_batch_size=16 --set train.micro_batch_size=16 --set train.seq_len=1024
  --set train.lr=1e-3 --set train.min_lr=1e-4 --set train.warmup_steps=75 --set train.compile=true
  --set train.eval_every=250 --set train.save_every=0)
run() {  # name, extra --set pairs
  local name=$1; shift
  python3 -m dsv3 train "${common[@]}" --set train.output_dir=runs/$name${SEED:-} "$@" > $OUT/$name.log 2>&1
  echo "$name exit $?"
}
run fp32 ${SEED:+--set train.seed=$SEED} &
run bf16w ${SEED:+--set train.seed=$SEED} --set train.param_dtype=bfloat16 &
run bf16wm ${SEED:+--set train.seed=$SEED} --set train.param_dtype=bfloat16 --set train.optimizer_state_dtype=bfloat16 &
wait
for n in fp32 bf16w bf16wm; do cp runs/$n${SEED:-}/metrics.jsonl $OUT/$n.metrics.jsonl 2>/dev/null; done
ls runs/*/ | head -30
