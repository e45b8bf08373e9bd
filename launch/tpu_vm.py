r"""Runs the trainer on a Cloud TPU VM slice, or on several slices (multislice), from this checkout.

  python launch/tpu_vm.py --name my-tpu --zone us-east5-b --accelerator-type v5litepod-16 \
      -- --config configs/lm.py:size=1b --workdir gs://BUCKET/runs/1b
  python launch/tpu_vm.py --name my-qr --zone us-east5-b --accelerator-type v5litepod-16 \
      --num-slices 2 -- --config configs/lm.py:size=1b --workdir gs://BUCKET/runs/1b-2x

What it executes (print it with --dry-run) is one bash script:
  1. create the TPU VM (`gcloud compute tpus tpu-vm create`), or with --queued / --num-slices > 1 a
     queued resource (`gcloud compute tpus queued-resources create --node-count`, the only way to
     get slices that can form a multislice), unless it exists already: then it is reused; wait for
     the queued resource to be ACTIVE;
  2. pack this checkout (`git archive`, uncommitted edits of tracked files included), copy it to
     every worker of every slice (`tpu-vm scp --worker=all`) and `pip install -e` it there with
     jax[tpu];
  3. run the same train command on every worker (`tpu-vm ssh --worker=all`), all slices at once,
     the workers' output streamed here (and kept in ~/foundation.log on each worker).
Several slices also get the env one multislice job needs: MEGASCALE_NUM_SLICES, this slice's
MEGASCALE_SLICE_ID and worker 0 of slice 0 as MEGASCALE_COORDINATOR_ADDRESS (JAX reads them from
the environment before the TPU metadata, jax/_src/clusters/cloud_tpu_cluster.py), and
--config.mesh.dcn_data=<slices>: the slices split the batch, each holds a whole model replica.

Running it again resumes: the TPU is reused (or re-created after a preemption), the code is
copied again, and the trainer continues from the workdir's latest checkpoint. The workdir must be
one every host sees (gs://...). docs/launch.md has the whole walk-through.
"""

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launchlib  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A runtime (TPU VM image) per TPU generation: cloud.google.com/tpu/docs/runtimes
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
MEGASCALE_PORT = 8080
TARBALL = "foundation.tar.gz"


def parse(argv: list[str]):
  own, train_args = launchlib.split_train_args(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   usage="%(prog)s --name N --zone Z --accelerator-type T "
                                         "[options] -- <foundation.train arguments>")
  parser.add_argument("--name", required=True, help="the TPU VM, or the queued resource, to "
                      "create or reuse (with several slices its nodes are NAME-0, NAME-1, ...)")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default="", help="default: gcloud's configured project")
  parser.add_argument("--accelerator-type", required=True, help="each slice's type, e.g. "
                      "v4-32, v5litepod-16, v5p-64, v6e-16")
  parser.add_argument("--runtime-version", default="",
                      help="the TPU VM image (default: by generation, " +
                      ", ".join(f"{k}: {v}" for k, v in RUNTIMES.items()) + ")")
  parser.add_argument("--num-slices", type=int, default=1,
                      help="slices joined over the data-centre network (multislice)")
  parser.add_argument("--queued", action="store_true",
                      help="request a queued resource even for one slice (waits for capacity)")
  parser.add_argument("--spot", action="store_true", help="Spot TPUs (preemptible, cheaper)")
  parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                      help="an environment variable for the trainer on every worker")
  launchlib.add_common_flags(parser)
  args = parser.parse_args(own)
  if args.num_slices < 1:
    raise launchlib.LaunchError(f"--num-slices {args.num_slices}: must be 1 or more")
  if not args.runtime_version:
    generation = args.accelerator_type.rsplit("-", 1)[0]
    if generation not in RUNTIMES:
      raise launchlib.LaunchError(f"--accelerator-type {args.accelerator_type}: no default "
                                  f"runtime for {generation!r} (known: {', '.join(RUNTIMES)}); "
                                  f"pass --runtime-version")
    args.runtime_version = RUNTIMES[generation]
  for item in args.env:
    if "=" not in item:
      raise launchlib.LaunchError(f"--env {item}: expected NAME=VALUE")
  launchlib.check_shared_workdir(launchlib.workdir_of(train_args), "TPU VM worker")
  return args, train_args


def gcloud(args, *words: str) -> str:
  """A gcloud command with this run's zone (and project, when given)."""
  location = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
  return launchlib.quote_words(["gcloud", "compute", "tpus", *words, *location])


def nodes(args) -> list[str]:
  """The TPU VMs: one named NAME, or a queued resource's NAME-0 .. NAME-(n-1) (--node-prefix)."""
  if args.num_slices == 1:
    return [args.name]
  return [f"{args.name}-{i}" for i in range(args.num_slices)]


def create_or_reuse(args) -> list[str]:
  """Lines that create the TPU (VM or queued resource) unless it exists, then wait for it."""
  spot = ["--spot"] if args.spot else []
  if args.num_slices == 1 and not args.queued:
    describe = gcloud(args, "tpu-vm", "describe", args.name)
    create = gcloud(args, "tpu-vm", "create", args.name,
                    f"--accelerator-type={args.accelerator_type}",
                    f"--version={args.runtime_version}", *spot)
    return [f"# 1. the TPU VM: reuse {args.name} if it exists, else create it",
            f"{describe} >/dev/null 2>&1 || {create}"]
  shape = ([f"--node-id={args.name}"] if args.num_slices == 1 else
           [f"--node-count={args.num_slices}", f"--node-prefix={args.name}"])
  describe = gcloud(args, "queued-resources", "describe", args.name)
  create = gcloud(args, "queued-resources", "create", args.name,
                  f"--accelerator-type={args.accelerator_type}",
                  f"--runtime-version={args.runtime_version}", *shape, *spot)
  state = gcloud(args, "queued-resources", "describe", args.name, "--format=value(state.state)")
  return [f"# 1. the queued resource ({args.num_slices} slice(s)): reuse it if it exists, "
          f"else request it, then wait for capacity",
          f"{describe} >/dev/null 2>&1 || {create}",
          f"while state=$({state}) && [[ $state != ACTIVE ]]; do",
          '  if [[ $state == FAILED || $state == SUSPENDED ]]; then',
          f'    echo "queued resource {args.name} is $state" >&2; exit 1',
          "  fi",
          f'  echo "waiting for {args.name} to be ACTIVE (now $state)"; sleep 30',
          "done"]


def install(args) -> list[str]:
  """Lines that pack this checkout and install it on every worker of every node."""
  tarball = f"/tmp/foundation-{args.name}.tar.gz"
  # `git stash create` makes a commit of the tracked files as they are now (empty when clean):
  # the workers run what this checkout holds, not only what was committed.
  lines = ["# 2. this checkout, installed on every worker",
           f"tree=$(git -C {shlex.quote(ROOT)} stash create)",
           f'git -C {shlex.quote(ROOT)} archive --format=tar.gz -o {tarball} "${{tree:-HEAD}}"']
  setup = (f"rm -rf ~/foundation && mkdir -p ~/foundation && tar -xzf ~/{TARBALL} -C ~/foundation"
           f" && python3 -m pip install -q -e ~/foundation \"jax[tpu]\"")
  for node in nodes(args):
    lines.append(gcloud(args, "tpu-vm", "scp", tarball, f"{node}:{TARBALL}", "--worker=all"))
    lines.append(gcloud(args, "tpu-vm", "ssh", node, "--worker=all", f"--command={setup}"))
  return lines


def remote_command(args, train_args: list[str], env: dict[str, str]) -> str:
  """What each worker runs: the train command in the unpacked checkout, its output also kept."""
  exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
  train = launchlib.train_command(args.module, train_args)
  return (f"set -o pipefail; cd ~/foundation && {exports + ' ' if exports else ''}{train} "
          f"2>&1 | tee -a ~/foundation.log")


def run(args, train_args: list[str]) -> list[str]:
  """Lines that start the train command on every worker of every slice and wait for all."""
  env = dict(item.split("=", 1) for item in args.env)
  if args.num_slices == 1:
    command = remote_command(args, train_args, env)
    return ["# 3. the same train command on every worker; their output streams here",
            gcloud(args, "tpu-vm", "ssh", args.name, "--worker=all", f"--command={command}")]
  train_args = launchlib.with_slices(train_args, args.num_slices)
  ip = gcloud(args, "tpu-vm", "describe", nodes(args)[0],
              "--format=value(networkEndpoints[0].ipAddress)")
  lines = ["# 3. the same train command on every worker of every slice, all slices at once",
           f"coordinator=$({ip})", "pids=()"]
  for slice_id, node in enumerate(nodes(args)):
    megascale = {"MEGASCALE_COORDINATOR_ADDRESS": "COORDINATOR",
                 "MEGASCALE_PORT": str(MEGASCALE_PORT),
                 "MEGASCALE_NUM_SLICES": str(args.num_slices),
                 "MEGASCALE_SLICE_ID": str(slice_id)}
    command = remote_command(args, train_args, {**megascale, **env})
    ssh = gcloud(args, "tpu-vm", "ssh", node, "--worker=all", f"--command={command}")
    # The coordinator's address is only known when the script runs: splice in the variable.
    lines.append(ssh.replace("MEGASCALE_COORDINATOR_ADDRESS=COORDINATOR",
                             "MEGASCALE_COORDINATOR_ADDRESS='\"$coordinator\"'") + " &")
    lines.append("pids+=($!)")
  lines += ["status=0",
            'for pid in "${pids[@]}"; do wait "$pid" || status=$?; done',
            'exit "$status"']
  return lines


def render(args, train_args: list[str]) -> str:
  return launchlib.bash_script([*create_or_reuse(args), *install(args), *run(args, train_args)])


def main(argv: list[str]) -> int:
  args, train_args = parse(argv)
  return launchlib.print_or_run_script(render(args, train_args), args.dry_run)


if __name__ == "__main__":
  launchlib.main_guard(main)
