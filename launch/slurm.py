r"""Submits the trainer to a SLURM cluster of GPU nodes: one batch script, one `sbatch`.

  python launch/slurm.py --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \
      -- --config configs/lm.py:size=1b --workdir /shared/runs/1b

What it executes (print it with --dry-run) is `sbatch` with this batch script on its input:
  - one process per node owning all its GPUs (the default), or with --process-per-gpu one process
    per GPU (each sees only its own GPU through CUDA_VISIBLE_DEVICES=SLURM_LOCALID);
  - the coordinator is the allocation's first node (`scontrol show hostnames`), on a port derived
    from the job id; JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES=SLURM_NTASKS and, per task,
    JAX_PROCESS_ID=SLURM_PROCID are what foundation.mesh.initialize_distributed passes to
    jax.distributed.initialize;
  - the GPU XLA flags and allocator settings of launch/gpu_env.sh, sourced once in the batch
    script (FOUNDATION_GPUS = the job's GPU count, so the multi-GPU flags are on);
  - `srun --kill-on-bad-exit=1`: one failed task ends the step instead of leaving the others
    blocked in a collective.
Preemption and time limits: SLURM sends SIGTERM (--signal: also `--preempt-warning` seconds
before the time limit); the trainer saves the step all hosts agree on and exits 75; the script
then requeues the job (`scontrol requeue`), which starts again from that checkpoint. Resubmitting
the same command resumes the same way. docs/launch.md has the walk-through.
"""

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launchlib  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv: list[str]):
  own, train_args = launchlib.split_train_args(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   usage="%(prog)s --nodes N [options] -- <foundation.train "
                                         "arguments>")
  parser.add_argument("--nodes", type=int, required=True)
  parser.add_argument("--gpus-per-node", type=int, default=8)
  parser.add_argument("--process-per-gpu", action="store_true",
                      help="one process per GPU instead of one per node")
  parser.add_argument("--job-name", default="foundation")
  parser.add_argument("--partition", default="")
  parser.add_argument("--account", default="")
  parser.add_argument("--time", default="", help="the time limit, e.g. 24:00:00")
  parser.add_argument("--preempt-warning", type=int, default=300,
                      help="seconds before the time limit at which the trainer gets SIGTERM")
  parser.add_argument("--no-requeue", action="store_true",
                      help="do not requeue the job after a preemption (exit 75)")
  parser.add_argument("--python", default="python3",
                      help="the Python with foundation installed on the nodes")
  parser.add_argument("--chdir", default=ROOT,
                      help="the checkout on the shared file system (default: this one)")
  parser.add_argument("--output", default="slurm-%x-%j.out", help="sbatch --output")
  launchlib.add_common_flags(parser)
  args = parser.parse_args(own)
  if args.nodes < 1 or args.gpus_per_node < 1:
    raise launchlib.LaunchError(f"--nodes {args.nodes} --gpus-per-node {args.gpus_per_node}: "
                                f"both must be 1 or more")
  launchlib.workdir_of(train_args)  # it must be given; on SLURM the file system is shared
  return args, train_args


def directives(args) -> list[str]:
  tasks_per_node = args.gpus_per_node if args.process_per_gpu else 1
  lines = [f"--job-name={args.job_name}", f"--nodes={args.nodes}",
           f"--ntasks-per-node={tasks_per_node}", f"--gpus-per-node={args.gpus_per_node}",
           "--exclusive", f"--output={args.output}",
           # SIGTERM to the batch shell and the steps, this long before the time limit.
           f"--signal=B:TERM@{args.preempt_warning}"]
  if not args.no_requeue:
    lines.append("--requeue")
  lines += [f"--{k}={v}" for k, v in (("partition", args.partition),
                                      ("account", args.account), ("time", args.time)) if v]
  return [f"#SBATCH {line}" for line in lines]


def task_command(args, train_args: list[str]) -> str:
  """What each task runs: its rank from SLURM_PROCID (per task, so evaluated inside the task)."""
  gpu = 'export CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"; ' if args.process_per_gpu else ""
  train = launchlib.train_command(args.module, train_args, python=args.python)
  return f'{gpu}export JAX_PROCESS_ID="$SLURM_PROCID"; exec {train}'


def render(args, train_args: list[str]) -> str:
  total_gpus = args.nodes * args.gpus_per_node
  body = [
      *directives(args),
      "# Rendered by launch/slurm.py; submit it with sbatch (python launch/slurm.py does).",
      "set -euo pipefail",
      f"cd {shlex.quote(args.chdir)}",
      "",
      "# The GPU XLA flags and allocator settings (launch/gpu_env.sh), for this job's GPU count.",
      f"export FOUNDATION_GPUS={total_gpus}",
      "# shellcheck source=launch/gpu_env.sh",
      ". launch/gpu_env.sh",
      "",
      "# jax.distributed: the first node of the allocation coordinates; one process per task.",
      # (No `| head -n 1`: under pipefail, scontrol writing after head has gone fails the job.)
      'nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")',
      "coordinator=${nodes%%$'\\n'*}",
      'export JAX_COORDINATOR_ADDRESS="$coordinator:$((20000 + SLURM_JOB_ID % 20000))"',
      'export JAX_NUM_PROCESSES="$SLURM_NTASKS"',
      'echo "foundation: $SLURM_NTASKS processes on $SLURM_JOB_NUM_NODES nodes,' +
      ' coordinator $JAX_COORDINATOR_ADDRESS, XLA_FLAGS=$XLA_FLAGS"',
      "",
      "# In the background, so that the SIGTERM sent to this shell reaches the trainers at once.",
      "# shellcheck disable=SC2016  # $SLURM_* expand in each task, not here",
      f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(task_command(args, train_args))} &",
      "step=$!",
      "trap 'kill -TERM \"$step\" 2>/dev/null || true' TERM",
      "status=0",
      'wait "$step" || status=$?',
      'if [[ $status -gt 128 ]]; then wait "$step" || status=$?; fi  # the trap interrupted wait',
  ]
  if not args.no_requeue:
    body += [f"if [[ $status -eq {launchlib.EXIT_PREEMPTED} ]]; then",
             "  echo \"foundation: preempted at a saved step; requeueing $SLURM_JOB_ID\"",
             '  scontrol requeue "$SLURM_JOB_ID"',
             "fi"]
  body.append('exit "$status"')
  return "#!/bin/bash\n" + "\n".join(body) + "\n"


def main(argv: list[str]) -> int:
  args, train_args = parse(argv)
  return launchlib.print_or_run(render(args, train_args), ["sbatch"], args.dry_run)


if __name__ == "__main__":
  launchlib.main_guard(main)
