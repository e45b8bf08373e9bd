# shellcheck shell=bash
# XLA and allocator settings for NVIDIA Hopper GPUs (H100, H200). Source it before starting JAX:
#
#   . launch/gpu_env.sh && python -m foundation.train --config ... --workdir ...
#
# `python -m foundation.bench` sources this same file on a GPU and records what it set, so a
# benchmark runs with the launchers' flags. XLA reads XLA_FLAGS once, when the first backend
# starts: setting them later has no effect.
#
# Idempotent, and it never overrides you: a flag already named in XLA_FLAGS, or a variable already
# set, keeps your value. Every flag below exists in jaxlib 0.10.2's XLA (checked: an unknown flag
# aborts JAX at start-up with "Unknown flags in XLA_FLAGS"); the pages that document each are
# named beside it. Flags whose gain is not yet measured on our model (--xla_gpu_enable_triton_gemm=
# false: cuBLAS for every matmul, from JAX-Toolbox's list) are not set here: benchmarks/
# gpu_session.sh measures them as variants first.

_foundation_xla_flag() {  # append --name=value unless --name is already set
  case " ${XLA_FLAGS:-} " in
    *" ${1%%=*}="*) ;;
    *) XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$1" ;;
  esac
}

# Schedule asynchronous collectives to overlap with compute (on one GPU there are none, and it
# changes nothing). JAX "GPU performance tips" (docs.jax.dev/en/latest/gpu_performance_tips.html);
# NVIDIA JAX-Toolbox sets it in its images (docs.nvidia.com/jax-toolbox/environment-variables).
_foundation_xla_flag --xla_gpu_enable_latency_hiding_scheduler=true

# FSDP over several GPUs: pipeline the scanned layers' all-gathers and reduce-scatters with the
# previous layer's compute; double-buffering unrolls the layer loop by two so they can overlap.
# JAX-Toolbox rosetta/docs/GPU_performance.md, "Pipelined comm/compute for FSDP". Only with more
# than one GPU: on one they would only change the loop's shape.
_foundation_gpus=${FOUNDATION_GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)}
if [ "${_foundation_gpus:-0}" -gt 1 ]; then
  _foundation_xla_flag --xla_gpu_enable_pipelined_all_gather=true
  _foundation_xla_flag --xla_gpu_enable_pipelined_reduce_scatter=true
  _foundation_xla_flag --xla_gpu_enable_pipelined_all_reduce=true
  _foundation_xla_flag --xla_gpu_enable_while_loop_double_buffering=true
fi
export XLA_FLAGS

# JAX preallocates 75% of GPU memory by default; 90% leaves room for cuBLAS/cuDNN workspaces and
# lets larger models fit. JAX "GPU memory allocation" (docs.jax.dev/en/latest/gpu_memory_allocation
# .html; newer JAX reads XLA_CLIENT_MEM_FRACTION, older XLA_PYTHON_CLIENT_MEM_FRACTION); JAX-Toolbox
# GPU_performance.md ("we typically set it to 0.9").
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export XLA_CLIENT_MEM_FRACTION=${XLA_CLIENT_MEM_FRACTION:-$XLA_PYTHON_CLIENT_MEM_FRACTION}

unset -f _foundation_xla_flag
unset _foundation_gpus
