#!/usr/bin/env bash
# truesize's training step beside PyTorch's, on the same configs, alternately (A B A B):
#   memory: HF transformers' step peak above the weights (torch_memory.py) vs truesize verify's
#           measured and predicted `memory.peak_above_weights_bytes`, for each case below;
#   time:   GPT-2 124M f32 batch 1 × seq 256 forward + backward, nanoGPT-style PyTorch
#           (torch_nanogpt.py) vs truesize (`timing.forward_s + timing.backward_s`), medians.
# Needs jq, and PyTorch + transformers in a virtual environment outside the project:
#   PY=/path/to/venv/bin/python  PEERS=/path/to/peer/scripts  scripts/bench-pytorch.sh
# PEERS holds torch_memory.py and torch_nanogpt.py. A case whose torch flags hold --amp runs
# torch_memory.py under CPU autocast through scripts/torch-amp-memory.py (f32 master weights). ROUNDS (default 3) alternations for time,
# THREADS (default 2) for both sides; SKIP_TIME=1 or SKIP_MEMORY=1 to run one half.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PEERS=${PEERS:-../shared/bench}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
CFG=scripts/bench-configs
cargo build --release --quiet
TS=target/release/truesize
export RAYON_NUM_THREADS=$THREADS

# case: config batch seq [truesize flags] | [torch flags]
CASES=(
  "gpt2-124m.json 1 256 | "
  "gpt2-d384.json 8 256 | "
  "llama-d512.json 4 256 | "
  "qwen2-d256.json 2 512 | "
  "mistral-d512-window.json 2 512 | "
  "mixtral-d256.json 4 256 | "
  "gpt2-d384.json 8 256 --checkpoint blocks | --checkpointing"
  "llama-d512.json 4 256 --checkpoint blocks | --checkpointing"
  "gpt2-d384.json 4 256 --attention eager | --attn eager"
  "llama-d512.json 4 256 --attention eager | --attn eager"
  "qwen3-d512.json 4 256 | "
  "qwen3-moe-d256.json 4 256 | "
  "gemma2-d512.json 4 256 --attention eager | --attn eager"
  "gemma3-d512.json 4 256 | "
  "phi3-d512.json 4 256 | "
  "gpt2-d512.json 4 128 | "
  "llama-d640-tied.json 2 384 | "
  "llama-d640-tied.json 2 384 --checkpoint blocks | --checkpointing"
  "gpt2-d384.json 8 256 --dtype bf16 --amp | --amp bf16"
  "llama-d512.json 4 256 --dtype bf16 --amp | --amp bf16"
  "qwen2-d256.json 2 512 --dtype bf16 --amp | --amp bf16"
  "mistral-d512-window.json 4 255 --dtype bf16 --amp | --amp bf16"
  "gpt2-d384.json 8 256 --dtype bf16 --amp --checkpoint blocks | --amp bf16 --checkpointing"
  "llama-d512.json 4 256 --dtype bf16 --amp --checkpoint blocks | --amp bf16 --checkpointing"
)

mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }

if [ -z "${SKIP_MEMORY:-}" ]; then
  echo "| case | batch × seq | PyTorch (HF) peak above weights | truesize measured | truesize predicted | measured / PyTorch |"
  echo "|---|---:|---:|---:|---:|---:|"
  for c in "${CASES[@]}"; do
    left=${c%%|*}; torch_flags=${c#*|}
    read -r json batch seq ts_flags <<<"$left"
    # shellcheck disable=SC2086
    if [[ $torch_flags == *--amp* ]]; then
      torch=$("$PY" scripts/torch-amp-memory.py "$PEERS/torch_memory.py" "$CFG/$json" "$batch" \
        "$seq" --threads "$THREADS" $torch_flags)
    else
      torch=$("$PY" "$PEERS/torch_memory.py" "$CFG/$json" "$batch" "$seq" --threads "$THREADS" $torch_flags)
    fi
    pt=$(jq -r .peak_above_base_bytes <<<"$torch")
    # shellcheck disable=SC2086
    ours=$("$TS" verify --config "$CFG/$json" --batch "$batch" --seq "$seq" --no-artifacts \
      --format json $ts_flags || true)
    m=$(jq -r .memory.peak_above_weights_bytes <<<"$ours")
    p=$(jq -r '.memory.predicted_peak_bytes - .memory.weights_bytes' <<<"$ours")
    echo "| ${json%.json} ${ts_flags} | $batch × $seq | $(mib "$pt") MiB | $(mib "$m") MiB | $(mib "$p") MiB | $(ratio "$m" "$pt") |"
  done
fi

if [ -z "${SKIP_TIME:-}" ]; then
  pt_times=(); ts_times=()
  for _ in $(seq "$ROUNDS"); do
    t=$("$PY" "$PEERS/torch_nanogpt.py" 768 12 12 50257 1024 1 256 3 | jq -r .fwd_bwd_s)
    pt_times+=("$t")
    t=$("$TS" verify --preset gpt2 --batch 1 --seq 256 --repeat 3 --no-artifacts --format json \
      | jq -r '.timing.forward_s + .timing.backward_s')
    ts_times+=("$t")
  done
  med() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
  pt=$(med "${pt_times[@]}"); ts=$(med "${ts_times[@]}")
  echo
  echo "GPT-2 124M f32 batch 1 × seq 256 forward + backward, $THREADS threads, median of $ROUNDS alternated rounds:"
  echo "  PyTorch (nanoGPT-style): ${pt} s   truesize: ${ts} s   truesize / PyTorch: $(ratio "$ts" "$pt")"
fi
