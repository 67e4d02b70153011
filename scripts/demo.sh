#!/usr/bin/env bash
# The end-to-end demo behind `make demo`: raw text to a trained DeepSeek-V3-style model that writes
# Python, on a CPU, in minutes. Every step is one visible `dsv3` command you can rerun by hand.
#   corpus      the Python standard library's code and docs (ships with the interpreter: no download)
#   preprocess  clean, filter, deduplicate, train the tokenizer, write train/valid token shards
#   train       the `tiny` preset (MLA, DeepSeekMoE, MTP) until it beats the unigram baseline
#   generate    continue a prompt with the trained checkpoint and the latent-cache decoder
# Rerunning it continues where it stopped: the pipeline skips finished parts, training resumes
# from the newest complete checkpoint. Start over with: rm -rf data/demo runs/demo
set -euo pipefail

DSV3=${DSV3:-.venv/bin/dsv3}
RUN_DIR=runs/demo
start=$SECONDS

step() {  # step "title" command...: show the command (copy-pasteable), run it, say how long it took
    local title=$1 t0=$SECONDS shown="" arg
    shift
    for arg in "$@"; do
        [[ $arg =~ ^[A-Za-z0-9_./=:-]+$ ]] && shown+="$arg " || shown+="\"$arg\" "
    done
    printf '\n\033[1;34m== %s\033[0m\n\033[2m$ %s\033[0m\n' "$title" "${shown% }"
    "$@"
    printf '\033[2m(%ds)\033[0m\n' $((SECONDS - t0))
}

step "1/4 corpus: the Python standard library as documents" \
    "$DSV3" corpus stdlib --output data/demo/raw/stdlib.jsonl.zst
step "2/4 data pipeline: clean, filter, dedup, tokenizer, shards" \
    "$DSV3" preprocess --config configs/data/demo.yaml
step "3/4 train the tiny DeepSeek-V3 on CPU" \
    "$DSV3" train --config configs/train/demo.yaml --resume auto
step "4/4 generate with the best checkpoint" \
    "$DSV3" generate --checkpoint "$RUN_DIR" --prompt "import os" --max-new-tokens 80 --seed 1

printf '\n\033[1;32mdemo done in %dm%02ds.\033[0m Outputs:\n' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60))
printf '  %-22s %s\n' \
    "documents + report" "data/demo/ (report.json)" \
    "tokenizer" "data/demo/tokenizer/tokenizer.json" \
    "checkpoints" "$RUN_DIR/step_*/ (Hugging Face layout + trainer state)" \
    "metrics" "$RUN_DIR/metrics.jsonl, tensorboard --logdir $RUN_DIR" \
    "plots" "$RUN_DIR/loss_curve.png $RUN_DIR/expert_load.png"
