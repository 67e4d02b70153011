#!/usr/bin/env bash
# Every GPU figure docs/performance.md quotes, in one go, on one GPU:
#
#     bash benchmarks/gpu.sh OUTDIR    # OUTDIR/results.jsonl (one JSON line per result), log.txt,
#                                      # kernels.dsv3.txt / kernels.hf.txt (the compiled step's GPU kernels)
#
# STEPS picks a subset (default: all, in this order):
#     parity fast_paths fast_paths_fp32 train train_eager train_1b train_ac train_sac train_chunked cross_entropy
#     train_bf16_moments train_fp32_weights train_bf16_weights train_fp8 train_whole_compile train_8k train_32k serve decode
#     decode_fp8 decode_fp32 moe_layer moe_layer_train
# PROFILE=1 adds the `train` step's kernel tables and traces; the profiler stays attached to the process
# and slows later launches, so that step's later systems are then timed slow: headline figures without it.
# CUDA_VISIBLE_DEVICES picks the GPU: two instances with different STEPS can share a 2-GPU machine.
# Each step has its own time limit (STEP_TIMEOUT seconds, default 900); one failing step does not stop the rest.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUTDIR}
mkdir -p "$out"
py=${PYTHON:-python3}
steps=${STEPS:-parity fast_paths fast_paths_fp32 train train_eager train_1b train_ac train_sac train_chunked cross_entropy train_bf16_moments train_fp32_weights train_bf16_weights train_fp8 train_whole_compile train_8k train_32k serve decode decode_fp8 decode_fp32 moe_layer moe_layer_train}
export PYTHONUNBUFFERED=1

step() {  # step NAME SCRIPT ARGS...: run, append its JSON lines to results.jsonl, everything to log.txt
    local name=$1
    shift
    case " $steps " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name: $* ($(date +%T))" | tee -a "$out/log.txt"
    timeout "${STEP_TIMEOUT:-900}" "$py" "$@" 2>>"$out/log.txt" \
        | sed -u "s/^{/{\"step\": \"$name\", /" | tee -a "$out/results.jsonl"
    echo "== $name: exit ${PIPESTATUS[0]} ($(date +%T))" | tee -a "$out/log.txt"
}

step parity benchmarks/gpu_parity.py --preset small --batch 2 --seq 512
# compiled blocks, activation checkpointing and fused AdamW's skip flag against the plain path, bf16
step fast_paths benchmarks/gpu_fast_paths.py --preset small --batch 2 --seq 1024
# the same in float32, where compiled and eager gradients must agree to ~1e-6: catches what bf16's
# rounding hides (torch 2.11's Dynamo zeroed the gradients behind a no-op cast: distributed.md, call 16)
step fast_paths_fp32 benchmarks/gpu_fast_paths.py --preset small --batch 1 --seq 512 --dtype fp32
# the trainer's own loop, the bare model step, compiled and eager transformers (the headline)
step train benchmarks/train_step.py --preset small --batch 8 --seq 2048 --steps 10 --compile \
    ${PROFILE:+--profile "$out/kernels"}
step train_eager benchmarks/train_step.py --preset small --batch 8 --seq 2048 --steps 10 --systems trainer,dsv3
step train_1b benchmarks/train_step.py --preset 1b --batch 16 --micro-batch 8 --seq 2048 --steps 10 --compile \
    --systems trainer
step train_ac benchmarks/train_step.py --preset small --batch 8 --seq 2048 --steps 10 --compile \
    --activation-checkpointing --systems trainer
# selective activation checkpointing: GEMM and attention outputs kept, the rest recomputed
step train_sac benchmarks/train_step.py --preset small --batch 8 --seq 2048 --steps 10 --compile \
    --activation-checkpointing selective --systems trainer
# the losses a chunk of 4096 positions at a time (train.loss_chunk_tokens): memory and speed
step train_chunked benchmarks/train_step.py --preset small --batch 8 --seq 2048 --steps 10 --compile \
    --loss-chunk 4096 --systems trainer
# the output head alone: whole logits, dsv3's chunked loss, Liger's fused linear cross-entropy
step cross_entropy benchmarks/cross_entropy.py
# AdamW's moments in bf16 (train.optimizer_state_dtype, DeepSeek-V3's): memory and the optimizer's time
step train_bf16_moments benchmarks/train_step.py --preset small --batch 8 --seq 2048 --steps 10 --compile \
    --moments bfloat16 --systems trainer
# float32 weights under bf16 autocast (train.param_dtype: float32, the default before 2026-12-01)
step train_fp32_weights benchmarks/train_step.py --preset small --batch 8 --seq 2048 --steps 10 --compile \
    --param-dtype float32 --systems trainer
# bf16 weights with float32 masters in the optimizer (train.param_dtype), with bf16 moments, beside
# compiled transformers in the same process
step train_bf16_weights benchmarks/train_step.py --preset small --batch 8 --seq 2048 --steps 10 --compile \
    --moments bfloat16 --param-dtype bfloat16 --systems trainer,hf
# FP8 linears (train.fp8: attention projections, dense and shared-expert FFNs, blockwise-scaled)
step train_fp8 benchmarks/train_step.py --preset small --batch 8 --seq 2048 --steps 10 --compile --fp8 \
    --systems trainer,dsv3
# the whole training forward compiled as one graph (train.compile=model) against each block on its own
step train_whole_compile benchmarks/train_step.py --preset small --batch 8 --seq 2048 --steps 10 --compile \
    --compile-scope model --systems trainer
# long context with YaRN (the trainer only): 8 x 8192 in micro-batches of 4, 2 x 32768 recomputing blocks
step train_8k benchmarks/train_step.py --preset small --batch 8 --micro-batch 4 --seq 8192 --steps 5 --warmup 2 \
    --compile --systems trainer
step train_32k benchmarks/train_step.py --preset small --batch 2 --micro-batch 1 --seq 32768 --steps 5 --warmup 2 \
    --compile --activation-checkpointing --systems trainer
step serve benchmarks/serve.py --preset small
step decode benchmarks/decode.py --preset small --batch 1,32 --prompt-len 128 --new-tokens 128
step decode_fp8 benchmarks/decode.py --preset small --batch 1,32 --prompt-len 128 --new-tokens 128 \
    --systems dsv3,dsv3-graph --fp8-cache
# fp32: greedy tokens of eager, CUDA-graph and transformers must agree exactly (same_tokens_as = 1.0)
step decode_fp32 benchmarks/decode.py --preset small --dtype fp32 --batch 1,4 --prompt-len 64 --new-tokens 48 \
    --repeats 1 --warmup 1
# one MoE layer at 1 and 2 tokens (a decode step, a speculative verification): why MTP's step costs 1.4x
step moe_layer benchmarks/moe_layer.py --preset small --tokens 1,2,4
# one MoE layer's training forward + backward at small's 8 x 2048 batch: time and saved activations
step moe_layer_train benchmarks/moe_layer.py --preset small --train --tokens 16384 --iters 30
exit 0
