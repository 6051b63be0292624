#!/usr/bin/env bash
# The README's fit table: for a few 7–9B models, each weight format and context, the memory one
# sequence needs (weights + f16 KV cache + the activations of a 512-token prefill chunk with
# fused attention + 1 GiB assumed runtime overhead) and the largest batch that fits in 24, 48 and 80 GiB. All from
# `truesize infer --shapes-only` (nothing is loaded); configs are the models' HF config.json
# values, written to a temp folder.
#
#   scripts/fit-table.sh            # markdown on stdout
#
# Needs jq and a built truesize (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/truesize}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# meta-llama/Llama-3.1-8B
cat >"$TMP/llama-3.1-8b.json" <<'JSON'
{"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
 "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
 "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": false, "vocab_size": 128256,
 "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
JSON
# Qwen/Qwen2.5-7B
cat >"$TMP/qwen2.5-7b.json" <<'JSON'
{"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
 "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
 "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": false, "vocab_size": 152064}
JSON
# mistralai/Mistral-7B-v0.1 (4,096-token sliding window)
cat >"$TMP/mistral-7b-v0.1.json" <<'JSON'
{"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
 "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
 "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": false,
 "vocab_size": 32000}
JSON

# Qwen/Qwen3-8B and google/gemma-2-9b (sliding window on alternate layers), as committed
cp tests/data/configs/qwen3-8b.json tests/data/configs/gemma-2-9b.json "$TMP/"

CONTEXTS=${CONTEXTS:-"4096 32768 131072"}
FORMATS=${FORMATS:-"bf16 q8_0 q4_k_m"}
BUDGETS=${BUDGETS:-"24GiB 48GiB 80GiB"}

echo "| model | weights | context | weights (GB) | KV cache, 1 seq (GiB) | need, 1 seq (GiB) | $(for b in $BUDGETS; do printf 'max batch in %s | ' "$b"; done)"
echo "|---|---|---:|---:|---:|---:|$(for b in $BUDGETS; do printf -- '---:|'; done)"
for m in llama-3.1-8b qwen2.5-7b mistral-7b-v0.1 qwen3-8b gemma-2-9b; do
  for f in $FORMATS; do
    for t in $CONTEXTS; do
      row="| $m | $f | $t |"
      if [ "$t" -gt "$(jq '.max_position_embeddings' "$TMP/$m.json")" ]; then
        echo "$row beyond its $(jq '.max_position_embeddings' "$TMP/$m.json") positions | | |$(for b in $BUDGETS; do printf ' |'; done)"
        continue
      fi
      first=1
      for b in $BUDGETS; do
        j=$("$BIN" infer --config "$TMP/$m.json" --weights "$f" --kv-dtype f16 --shapes-only \
              --prompt $((t - 1)) --generate 1 --memory "$b" --format json)
        if [ $first = 1 ]; then
          row="$row $(jq -r '.fit.need.weights_bytes / 1e9 | . * 100 | round / 100' <<<"$j") |"
          row="$row $(jq -r '.fit.need.kv_cache_bytes / 1073741824 | . * 100 | round / 100' <<<"$j") |"
          row="$row $(jq -r '.fit.need.total_bytes / 1073741824 | . * 100 | round / 100' <<<"$j") |"
          first=0
        fi
        row="$row $(jq -r '.fit.largest_batch // "does not fit"' <<<"$j") |"
      done
      echo "$row"
    done
  done
done
