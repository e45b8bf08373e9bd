#!/usr/bin/env bash
# Regenerates docs/scaling.md: the TPU fit check for the 1b/7b/13b/70b configs on v4, v5e and v5p
# topologies, each with a mesh and remat setting chosen to fit. Runs on a CPU machine.
#
#   bash benchmarks/fit_table.sh            # all rows (about an hour on 2 cores)
#   bash benchmarks/fit_table.sh 7b         # only the rows whose name contains "7b"
#
# Needs libtpu in a separate environment, kept out of the default install (it makes every CPU run
# print TPU initialisation errors):
#   python3 -m venv .venv-tpu && .venv-tpu/bin/pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')" \
#       flax optax orbax-checkpoint ml-collections absl-py
set -euo pipefail
cd "$(dirname "$0")/.."
python=${TPU_PYTHON:-.venv-tpu/bin/python}
only=${1:-}

# name | topology | flags
rows=(
  "1b-v4|v4:2x2x2|--config.batch_size=32 --config.model.remat_policy=full --config.model.logits_chunk=256"
  "1b-v5e|TPU v5 lite:4x4|--config.batch_size=64 --config.model.remat_policy=full --config.model.logits_chunk=256"
  "1b-v5p|v5p:2x2x2|--config.batch_size=64 --config.model.remat_policy=dots --config.model.logits_chunk=256"
  "7b-v4|v4:4x4x4|--config.batch_size=64 --config.model.remat_policy=full --config.model.logits_chunk=512"
  "7b-v5e|TPU v5 lite:8x8|--config.batch_size=64 --config.model.remat_policy=full --config.model.logits_chunk=512"
  "7b-v5p|v5p:4x4x4|--config.batch_size=128 --config.model.remat_policy=dots --config.model.logits_chunk=512"
  "13b-v4|v4:4x4x8|--config.batch_size=128 --config.model.remat_policy=full --config.model.logits_chunk=512"
  "13b-v5e|TPU v5 lite:8x16|--config.batch_size=128 --config.model.remat_policy=full --config.model.logits_chunk=512"
  "13b-v5p|v5p:4x4x8|--config.batch_size=128 --config.model.remat_policy=dots --config.model.logits_chunk=512"
  "70b-v4|v4:8x8x8|--config.batch_size=512 --config.model.remat_policy=full --config.model.logits_chunk=512"
  "70b-v5e|TPU v5 lite:16x16|--config.batch_size=64 --config.model.remat_policy=full --config.model.logits_chunk=512 --config.mesh.fsdp=64 --config.mesh.tensor=4"
  "70b-v5p|v5p:8x8x8|--config.batch_size=512 --config.model.remat_policy=full --config.model.logits_chunk=512"
)

for row in "${rows[@]}"; do
  IFS='|' read -r name topology flags <<<"$row"
  [[ -n "$only" && "$name" != *"$only"* ]] && continue
  size=${name%%-*}
  echo "== $name"
  # shellcheck disable=SC2086
  PYTHONPATH=. TPU_WORKER_HOSTNAMES=localhost "$python" -m foundation.compile \
      --config "configs/lm.py:size=$size" --topology "$topology" $flags \
      --json "benchmarks/fit/$name.json" 2>&1 | grep -v -e "^WARNING" -e "Failed to find host" || true
done
python benchmarks/render_fit_table.py > docs/scaling.md
echo "wrote docs/scaling.md"
