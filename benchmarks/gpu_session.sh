#!/usr/bin/env bash
# The GPU rows of benchmarks/RESULTS.md in a few device calls: speed, peer, numerics, fit.
#
#   benchmarks/gpu_session.sh PART      PART: 1b | 125m | checks | 1b-more | all
#
# 1b: the fast path (cuDNN attention, scanned; profiled) with both peers, and unrolled. 125m: the
# same, plus XLA attention and cuBLAS-only matmuls. checks: the loss curves (fast vs reference
# path) and the largest model that fits. 1b-more: XLA attention and cuBLAS-only at 1b. Each part
# fits one 10-minute device call; the first three fit a 30-device-minute session in that order
# (docs/gpu.md, "A GPU session"). Within a part the items run most important first, each under
# `timeout`; one that would end after BUDGET_S seconds (default 540) is skipped and named, so the
# results are written before the call's limit. A model that does not fit (the bench's exit
# status 3) runs again with the leaner settings after its `--`.
#
# Results: $OUT/PART.json (a list of every record the part wrote), $OUT/PART.log (all output);
# the table printed last is benchmarks/render_results.py's. OUT defaults to /tmp/gpu_session.
#
# The device image lacks ml-collections and cannot reach PyPI: carry its wheel. Here, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl ml-collections==1.1.0
# then each device call: command "bash benchmarks/gpu_session.sh 1b", carry [".whl"].
#
# SMOKE=1: every item at sizes test and tiny on this machine's CPU (no cuDNN variants, an eager
# peer, three steps): how this script is tested without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: $0 1b|125m|checks|1b-more|all}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_session}
BUDGET_S=${BUDGET_S:-540}
work=$(mktemp -d /tmp/gpu_session.XXXX)
skipped=()
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [[ "${SMOKE:-0}" == 1 ]]; then
  sizes=(test tiny); seqs=(32 32); batches=(8 8)
  attentions=(xla); steps="--steps=3 --warmup=1"; peer_compile=--nopeer_compile
  curve_steps=4; fit_sizes=(tiny test); fit_batches=(8 8); fit_seq=32
  lean="--config.model.remat_policy=full"
else
  sizes=(125m 1b); seqs=(1024 2048); batches=(32 8)
  attentions=(cudnn xla); steps="--steps=30 --warmup=5"; peer_compile=--peer_compile
  curve_steps=50; fit_sizes=(7b 3b); fit_batches=(4 4); fit_seq=2048
  lean="--config.model.remat_policy=full --config.model.logits_chunk=256"
fi

# ------------------------------------------------------------------ helpers

item() {  # item NAME EST_SECONDS COMMAND...: runs it unless it would end past the budget
  local name=$1 est=$2
  shift 2
  if (( SECONDS + est > BUDGET_S )); then
    echo "-- $name: skipped (needs ~${est}s; ${SECONDS}s of ${BUDGET_S}s used)"
    skipped+=("$name")
    return 124
  fi
  echo "-- $name: $*"
  timeout --kill-after=10 $(( BUDGET_S - SECONDS )) "$@"
  local status=$?
  (( status == 124 )) && echo "-- $name: stopped at the budget"
  return $status
}

bench() {  # bench NAME EST ARGS...: foundation.bench, its record in $work/NAME.json
  local name=$1 est=$2
  shift 2
  item "$name" "$est" "$PY" -m foundation.bench "$@" $steps --json "$work/$name.json"
}

bench_fitting() {  # bench_fitting NAME EST ARGS... -- LEANER ARGS...: again, leaner, on status 3
  local name=$1 est=$2 args=()
  shift 2
  while (( $# )) && [[ $1 != -- ]]; do args+=("$1"); shift; done
  (( $# )) && shift
  bench "$name" "$est" "${args[@]}"
  local status=$?
  if (( status == 3 && $# )); then
    bench "$name-lean" "$est" "${args[@]}" "$@"
  fi
}

peer() {  # peer NAME EST PRECISION ARGS...: benchmarks/peer_torch.py alone
  local name=$1 est=$2 precision=$3
  shift 3
  item "$name" "$est" "$PY" benchmarks/peer_torch.py "$@" $steps --precision "$precision" \
    "${peer_compile/peer_/}" --json "$work/$name.json"
}

# The one-GPU settings these rows measure; 1b and up default to settings for a TPU slice
# (configs/lm.py FIT_DEFAULTS: gradient accumulation, remat full, chunked logits).
one_gpu="--config.grad_accum=1 --config.model.remat_policy=none --config.model.logits_chunk=0"

model() {  # model I: the --config arguments of sizes[I] at its batch and sequence
  echo "--config configs/lm.py:size=${sizes[$1]} --config.batch_size=${batches[$1]}" \
       "--config.seq_len=${seqs[$1]} $one_gpu"
}

# ------------------------------------------------------------------ parts

run_size() {  # run_size I: the fast path of sizes[I] (profiled), its peers, scan off
  local s=${sizes[$1]} fast=${attentions[0]} m
  m=$(model "$1")
  # With --peer the bench runs the peer (our numerics: bf16 autocast) before JAX takes the GPU.
  bench "$s-$fast-scan" $(( $1 ? 190 : 110 )) $m --config.model.attention=$fast \
    --peer $peer_compile --profile 3
  peer "$s-peer-bf16" $(( $1 ? 110 : 60 )) bf16 $m
  bench_fitting "$s-$fast-unrolled" $(( $1 ? 120 : 70 )) $m --config.model.attention=$fast \
    --config.model.scan_layers=false -- --config.model.remat_policy=dots
}

run_size_more() {  # run_size_more I: XLA attention, and cuBLAS-only matmuls, for sizes[I]
  local s=${sizes[$1]} fast=${attentions[0]} m
  m=$(model "$1")
  if (( ${#attentions[@]} > 1 )); then
    # XLA attention keeps [batch, heads, seq, seq] scores: at 1b they must be recomputed.
    bench_fitting "$s-xla-scan" $(( $1 ? 90 : 50 )) $m --config.model.attention=xla \
      -- --config.model.remat_policy=dots
    bench_fitting "$s-xla-unrolled" $(( $1 ? 120 : 70 )) $m --config.model.attention=xla \
      --config.model.scan_layers=false -- --config.model.remat_policy=dots
  fi
  # cuBLAS for every matmul, no Triton GEMM fusions: not in gpu_env.sh until it measures faster.
  XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_triton_gemm=false" \
    bench "$s-$fast-scan-no-triton-gemm" $(( $1 ? 90 : 50 )) $m --config.model.attention=$fast
}

run_numerics() {  # loss curves, fast path vs reference path: same start, same batches
  local fast="--fast model.attention=${attentions[0]} --fast model.scan_layers=false"
  item "${sizes[0]}-loss-curve" 120 "$PY" benchmarks/loss_curve.py \
    --config "configs/lm.py:size=${sizes[0]}" --config.batch_size=8 \
    --config.seq_len="${seqs[0]}" $fast --reference model.attention=xla \
    --steps $curve_steps --yardstick --json "$work/${sizes[0]}-loss-curve.json"
  item "${sizes[1]}-loss-curve" 180 "$PY" benchmarks/loss_curve.py \
    --config "configs/lm.py:size=${sizes[1]}" --config.batch_size=4 \
    --config.seq_len="${seqs[1]}" $one_gpu $fast --reference model.attention=xla \
    --reference model.remat_policy=dots --steps $curve_steps \
    --json "$work/${sizes[1]}-loss-curve.json"
}

run_fit() {  # the largest model that fits one GPU at the sequence length, leanest settings
  local i
  for i in "${!fit_sizes[@]}"; do
    bench_fitting "fit-${fit_sizes[$i]}" 110 --config "configs/lm.py:size=${fit_sizes[$i]}" \
      --config.batch_size="${fit_batches[$i]}" --config.seq_len=$fit_seq $one_gpu \
      --config.model.attention="${attentions[0]}" $lean -- --config.batch_size=1
  done
}

main() {
  if ! "$PY" -c "import ml_collections" 2>/dev/null; then
    if ! ls .whl/ml_collections-*.whl >/dev/null 2>&1; then
      echo "ml_collections is missing and no .whl/ml_collections-*.whl was carried (see the header)"
      return 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
      .whl/*.whl || return 2
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  . launch/gpu_env.sh  # the bench applies it too; sourced here so that the log shows it
  echo "== $part on $(hostname) at $(date -u +%FT%TZ); XLA_FLAGS=$XLA_FLAGS"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv 2>/dev/null || echo "(no nvidia-smi)"
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
  "$PY" -c "import torch, transformers as t; print('torch', torch.__version__, 'transformers',
    t.__version__, 'cuda', torch.cuda.is_available())" 2>/dev/null \
    || echo "torch/transformers are not importable: no peer"
  case $part in
    1b) run_size 1 ;;
    125m) run_size 0; run_size_more 0 ;;
    checks) run_numerics; run_fit ;;
    1b-more) run_size_more 1 ;;
    all) run_size 1; run_size 0; run_size_more 0; run_numerics; run_fit; run_size_more 1 ;;
    *) echo "unknown part '$part': 1b, 125m, checks, 1b-more or all"; return 2 ;;
  esac
  "$PY" - "$work" "$OUT/$part.json" <<'EOF'
import glob, json, os, sys
records = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
  with open(path) as f:
    records.append({"name": os.path.basename(path)[:-5], **json.load(f)})
with open(sys.argv[2], "w") as f:
  json.dump(records, f, indent=1)
print(f"wrote {len(records)} records to {sys.argv[2]}")
EOF
  (( ${#skipped[@]} )) && echo "skipped for the budget: ${skipped[*]}"
  "$PY" benchmarks/render_results.py "$OUT/$part.json"
  echo "== $part done in ${SECONDS}s"
}

main 2>&1 | tee -a "$OUT/$part.log"
exit "${PIPESTATUS[0]}"
