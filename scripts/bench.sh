#!/usr/bin/env bash
# Speed of truesize's training step (GPT-2 124M, batch 1, seq 256, f32, CPU):
#   1. this machine's roofline: a 2048² f32 matmul through candle (`truesize bench-matmul`,
#      the same probe as `verify --measure-peak`), measured before and after; the higher is used;
#   2. truesize forward+backward with `verify --repeat N --format json` (median of N);
#   3. the same with the counting allocator switched off (TRUESIZE_NO_ALLOC_COUNT=1): its overhead;
#   4. a PyTorch peer (PEER, below) on the same model and shape.
# 2–4 run alternately (A B C A B C ...) so load drifts hit all of them; medians are reported.
# Achieved FLOP/s = model FLOPs of one fwd+bwd (`flops.total` × batch from truesize's estimate,
# 2·m·n·k per matmul, attention in full) / measured seconds.
#
# Environment:
#   ROUNDS     alternations (default 3)          REPEAT  --repeat per truesize run (default 5)
#   TORCH_PY   python with torch (default $HOME/torch-venv/bin/python; skipped if missing)
#   PEER       a PyTorch timing script for a nanoGPT-style GPT-2, called as
#              `PEER N_EMBD N_LAYER N_HEAD VOCAB BLOCK BATCH SEQ REPS` and printing JSON with
#              fwd_bwd_s, fwd_s and params (kept outside the project); skipped if unset
#   BATCH, SEQ (default 1, 256)                  SKIP_BUILD=1 to use the existing binary
#   TRUESIZE_BIN  binary to time (default target/release/truesize); REPO  repository root
#   THREADS    threads for candle (RAYON_NUM_THREADS) and PyTorch (OMP_NUM_THREADS), roofline
#              included (default: all cores). THREADS=1 is far less sensitive to a busy machine.
# Needs: cargo, jq, awk. Run it on a quiet machine: it prints `uptime` before and after.
set -euo pipefail

repo=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
cd "$repo"
ROUNDS=${ROUNDS:-3}
REPEAT=${REPEAT:-5}
BATCH=${BATCH:-1}
SEQ=${SEQ:-256}
TORCH_PY=${TORCH_PY:-$HOME/torch-venv/bin/python}
PEER=${PEER:-}
BIN=${TRUESIZE_BIN:-$repo/target/release/truesize}
# GPT-2 124M as the peer takes it: n_embd n_layer n_head vocab block
GPT2_ARGS=(768 12 12 50257 1024)

cores=$(nproc)
if [[ -n ${THREADS:-} ]]; then
    export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
fi
say() { printf '[bench] %s\n' "$*" >&2; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

[[ ${SKIP_BUILD:-0} == 1 ]] || cargo build --release --quiet
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

say "load before: $(uptime)"
say "cpu: $cores cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
peak1=$("$BIN" bench-matmul | jq .flops_per_s)

have_torch=0
if [[ -x "$TORCH_PY" && -n "$PEER" && -f "$PEER" ]] && "$TORCH_PY" -c 'import torch' 2>/dev/null; then
    have_torch=1
    say "peer: $PEER with torch $("$TORCH_PY" -c 'import torch; print(torch.__version__, torch.get_num_threads(), "threads")')"
else
    say "no PyTorch at TORCH_PY=$TORCH_PY (or no $PEER): peer skipped"
fi

verify=(verify --preset gpt2 --batch "$BATCH" --seq "$SEQ" --dtype f32 --repeat "$REPEAT"
        --no-artifacts --format json)
for r in $(seq 1 "$ROUNDS"); do
    # verify exits 1 when a check fails (e.g. with counting off); the timings are still valid.
    "$BIN" "${verify[@]}" >"$tmp/ts_$r.json" || true
    jq '.timing.forward_s + .timing.backward_s' "$tmp/ts_$r.json" >>"$tmp/ts"
    TRUESIZE_NO_ALLOC_COUNT=1 "$BIN" "${verify[@]}" >"$tmp/nc_$r.json" || true
    jq '.timing.forward_s + .timing.backward_s' "$tmp/nc_$r.json" >>"$tmp/nc"
    if [[ $have_torch == 1 ]]; then
        "$TORCH_PY" "$PEER" "${GPT2_ARGS[@]}" "$BATCH" "$SEQ" "$REPEAT" >"$tmp/pt_$r.json"
        jq .fwd_bwd_s "$tmp/pt_$r.json" >>"$tmp/pt"
    fi
    say "round $r: truesize $(tail -1 "$tmp/ts") s, no counting $(tail -1 "$tmp/nc") s$([[ $have_torch == 1 ]] && echo ", pytorch $(tail -1 "$tmp/pt") s")"
done
peak2=$("$BIN" bench-matmul | jq .flops_per_s)
say "load after: $(uptime)"

# FLOPs of the step: the estimate's forward+backward per sequence × batch (else 3 × forward).
flops=$(jq "(.flops.total // (3 * .flops.forward)) * .run.batch" "$tmp/ts_1.json")
peak=$(awk -v a="$peak1" -v b="$peak2" 'BEGIN {print (a > b ? a : b)}')
ts=$(median <"$tmp/ts")
nc=$(median <"$tmp/nc")
pt=nan
[[ $have_torch == 1 ]] && pt=$(median <"$tmp/pt")

awk -v flops="$flops" -v p1="$peak1" -v p2="$peak2" -v peak="$peak" -v ts="$ts" -v nc="$nc" \
    -v pt="$pt" -v rounds="$ROUNDS" -v rep="$REPEAT" -v b="$BATCH" -v s="$SEQ" \
    -v th="${THREADS:-$cores}" 'BEGIN {
    printf "GPT-2 124M, batch %d, seq %d, f32, CPU, %s thread(s); %d rounds, truesize --repeat %d\n", b, s, th, rounds, rep
    printf "matmul roofline (2048^2 f32, candle): %.1f / %.1f GFLOP/s (before / after); using %.1f\n", p1/1e9, p2/1e9, peak/1e9
    printf "model FLOPs of one fwd+bwd: %.4g  -> roofline time %.3f s\n", flops, flops/peak
    printf "truesize fwd+bwd median:   %.3f s  %.1f GFLOP/s  = %.1f%% of roofline\n", ts, flops/ts/1e9, 100*flops/ts/peak
    printf "  counting allocator off:  %.3f s  -> counting overhead %+.2f%%\n", nc, 100*(ts-nc)/nc
    if (pt != "nan") {
        printf "pytorch fwd+bwd median:    %.3f s  %.1f GFLOP/s  = %.1f%% of roofline\n", pt, flops/pt/1e9, 100*flops/pt/peak
        printf "truesize / pytorch time:   %.2fx\n", ts/pt
    }
}'
