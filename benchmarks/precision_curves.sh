#!/usr/bin/env bash
# The GPU reference run (docs/training.md) in three precisions at once on one GPU, for their loss
# curves (not their speed: the three share the GPU): float32 weights under bf16 autocast, bf16 weights
# with float32 masters (the one-GPU default), and those with bf16 AdamW moments. Same data order,
# initialisation and schedule; needs the demo shards (`make demo`, or its first two steps).
#
#     SEED=7 STEPS_N=1000 bash benchmarks/precision_curves.sh OUTDIR   # OUTDIR/{fp32,bf16w,bf16wm}.log
set -u
out=${1:?usage: bash benchmarks/precision_curves.sh OUTDIR}
mkdir -p "$out"
seed=${SEED:-1234}
common=(--config small --set model.vocab_size=8192
  --set 'data.train=[data/demo/shards/train]' --set 'data.valid=[data/demo/shards/valid]'
  --set data.tokenizer=data/demo/tokenizer/tokenizer.json --set train.steps="${STEPS_N:-1000}"
  --set train.global_batch_size=16 --set train.micro_batch_size=16 --set train.seq_len=1024
  --set train.lr=1e-3 --set train.min_lr=1e-4 --set train.warmup_steps=75 --set train.compile=true
  --set train.eval_every=250 --set train.save_every=0 --set train.seed="$seed")
run() {  # NAME, then its --set pairs
  local name=$1
  shift
  python3 -m dsv3 train "${common[@]}" --set train.output_dir="runs/precision-$name-$seed" "$@" \
    > "$out/$name.log" 2>&1
  echo "$name: exit $?"
  cp "runs/precision-$name-$seed/metrics.jsonl" "$out/$name.metrics.jsonl" 2>/dev/null
}
run fp32 --set train.param_dtype=float32 &
run bf16w --set train.param_dtype=bfloat16 &
run bf16wm --set train.param_dtype=bfloat16 --set train.optimizer_state_dtype=bfloat16 &
wait
grep -H "eval step" "$out"/*.log
