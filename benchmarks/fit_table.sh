#!/usr/bin/env bash
# Regenerates docs/scaling.md: the TPU fit check, run on a CPU machine, for
#  - each size's defaults (nothing set but the topology) on the smallest slice docs/scaling.md names
#    for it (configs/lm.py FIT_DEFAULTS) -> benchmarks/results/fit-<size>.json, which
#    tests/test_compile.py compares with the defaults;
#  - hand-tuned settings of 1b/7b/13b/70b on v4, v5e and v5p slices -> benchmarks/fit/*.json.
#
#   bash benchmarks/fit_table.sh            # all rows (about two hours on 2 cores)
#   bash benchmarks/fit_table.sh 7b         # only the rows whose name contains "7b"
#   bash benchmarks/fit_table.sh fit-       # only the defaults
#
# Needs libtpu in a separate environment, kept out of the default install (it makes every CPU run
# print TPU initialisation errors):
#   python3 -m venv .venv-tpu && .venv-tpu/bin/pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')" \
#       flax optax orbax-checkpoint ml-collections absl-py
set -euo pipefail
cd "$(dirname "$0")/.."
python=${TPU_PYTHON:-.venv-tpu/bin/python}
only=${1:-}

# The hand-tuned rows pin grad_accum=1, fsdp=-1 and tensor=1, every size's defaults when they
# were measured, so that each repeats its recorded step.
pin="--config.grad_accum=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1"
# name | topology | flags | report
rows=(
  "fit-1b|v4:2x2x2||results"
  "fit-3b|v4:2x2x2||results"
  "fit-7b|TPU v5 lite:8x8||results"
  "fit-7b-v5p|v5p:4x4x4||results"
  "fit-13b|TPU v5 lite:8x16||results"
  "fit-70b|TPU v5 lite:16x16||results"
  "1b-v4|v4:2x2x2|$pin --config.batch_size=32 --config.model.remat_policy=full --config.model.logits_chunk=256|fit"
  "1b-v5e|TPU v5 lite:4x4|$pin --config.batch_size=64 --config.model.remat_policy=full --config.model.logits_chunk=256|fit"
  "1b-v5p|v5p:2x2x2|$pin --config.batch_size=64 --config.model.remat_policy=dots --config.model.logits_chunk=256|fit"
  "7b-v4|v4:4x4x4|$pin --config.batch_size=64 --config.model.remat_policy=full --config.model.logits_chunk=512|fit"
  "7b-v5e|TPU v5 lite:8x8|$pin --config.batch_size=64 --config.model.remat_policy=full --config.model.logits_chunk=512|fit"
  "7b-v5p|v5p:4x4x4|$pin --config.batch_size=128 --config.model.remat_policy=dots --config.model.logits_chunk=512|fit"
  "13b-v4|v4:4x4x8|$pin --config.batch_size=128 --config.model.remat_policy=full --config.model.logits_chunk=512|fit"
  "13b-v5e|TPU v5 lite:8x16|$pin --config.batch_size=128 --config.model.remat_policy=full --config.model.logits_chunk=512|fit"
  "13b-v5p|v5p:4x4x8|$pin --config.batch_size=128 --config.model.remat_policy=dots --config.model.logits_chunk=512|fit"
  "70b-v4|v4:8x8x8|$pin --config.batch_size=512 --config.model.remat_policy=full --config.model.logits_chunk=512|fit"
  "70b-v5e|TPU v5 lite:16x16|--config.grad_accum=1 --config.batch_size=64 --config.model.remat_policy=full --config.model.logits_chunk=512 --config.mesh.fsdp=64 --config.mesh.tensor=4|fit"
  "70b-v5p|v5p:8x8x8|$pin --config.batch_size=512 --config.model.remat_policy=full --config.model.logits_chunk=512|fit"
)

for row in "${rows[@]}"; do
  IFS='|' read -r name topology flags folder <<<"$row"
  [[ -n "$only" && "$name" != *"$only"* ]] && continue
  size=${name#fit-}
  size=${size%%-*}
  echo "== $name"
  # shellcheck disable=SC2086
  PYTHONPATH=. TPU_WORKER_HOSTNAMES=localhost "$python" -m foundation.compile \
      --config "configs/lm.py:size=$size" --topology "$topology" $flags \
      --json "benchmarks/$folder/$name.json" 2>&1 | grep -v -e "^WARNING" -e "Failed to find host" || true
done
python benchmarks/render_fit_table.py > docs/scaling.md
echo "wrote docs/scaling.md"
