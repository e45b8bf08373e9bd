r"""Runs the trainer on Kubernetes (GKE) as a JobSet on TPU or GPU node pools, or prints the
equivalent `xpk workload create` line.

  # TPU: 2 slices of v5litepod-16 (4 hosts each), an image with this checkout installed
  python launch/k8s.py --name run1 --image IMAGE --tpu-type v5litepod-16 --num-slices 2 \
      -- --config configs/lm.py:size=1b --workdir gs://BUCKET/runs/1b
  # GPU: 2 nodes of 8 H100s
  python launch/k8s.py --name run1 --image IMAGE --gpu-type nvidia-h100-80gb --nodes 2 \
      -- --config configs/lm.py:size=1b --workdir gs://BUCKET/runs/1b
  # the same through xpk (add --xpk-cluster): prints or runs `xpk workload create ...`

Without --dry-run the manifest goes to `kubectl apply -f -`; with it, the manifest is printed.
Both accelerators come from ONE template (`jobset()` below): one replicated job `workers` of
`replicas` x `hosts` pods, each running the same train command; the accelerator only chooses the
node selector, the resource, the pod count and how the processes find each other:
  - TPU: one replicated job per slice (replicas = slices) of one pod per TPU host; GKE's TPU
    webhook gives each pod TPU_WORKER_ID and TPU_WORKER_HOSTNAMES (and the MEGASCALE_* variables
    across slices), from which jax.distributed.initialize() finds its peers;
  - GPU: one pod per node; JAX_COORDINATOR_ADDRESS is pod 0's stable DNS name (JobSet's
    enableDNSHostnames), JAX_NUM_PROCESSES the node count and JAX_PROCESS_ID the pod's completion
    index; the command sources launch/gpu_env.sh first.
A preempted or failed pod restarts the whole JobSet (failurePolicy.maxRestarts); the trainer
resumes from the workdir's latest checkpoint (it must be gs:// or a volume every pod mounts).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launchlib  # pylint: disable=g-import-not-at-top,wrong-import-position

# GKE node labels per TPU generation (cloud.google.com/kubernetes-engine/docs/concepts/tpus), and
# whether its type names count chips (v5e, v6e) or TensorCores (two per chip: v4, v5p).
TPU_ACCELERATORS = {"v4": ("tpu-v4-podslice", 2), "v5p": ("tpu-v5p-slice", 2),
                    "v5litepod": ("tpu-v5-lite-podslice", 1), "v6e": ("tpu-v6e-slice", 1)}
# The slice topology for a chip count: 2-D for v5e/v6e, 3-D for v4/v5p.
TOPOLOGIES_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
TOPOLOGIES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
                 256: "4x8x8", 512: "8x8x8"}
CHIPS_PER_TPU_HOST = 4
COORDINATOR_PORT = 1234
WORKERS = "workers"  # the replicated job's name; pod DNS names are NAME-workers-<job>-<pod>.NAME


def parse(argv: list[str]):
  own, train_args = launchlib.split_train_args(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--name", required=True, help="the JobSet (or xpk workload) name")
  parser.add_argument("--image", required=True,
                      help="a container image with this checkout installed (launch/Dockerfile)")
  kind = parser.add_mutually_exclusive_group(required=True)
  kind.add_argument("--tpu-type", help="each slice's type: v4-16, v5litepod-16, v5p-32, v6e-16")
  kind.add_argument("--gpu-type", help="the GKE accelerator label, e.g. nvidia-h100-80gb")
  parser.add_argument("--num-slices", type=int, default=1, help="TPU slices")
  parser.add_argument("--nodes", type=int, default=1, help="GPU nodes")
  parser.add_argument("--gpus-per-node", type=int, default=8)
  parser.add_argument("--namespace", default="default")
  parser.add_argument("--max-restarts", type=int, default=10,
                      help="JobSet restarts after a failed or preempted pod (each resumes)")
  parser.add_argument("--grace-seconds", type=int, default=300, help="SIGTERM to SIGKILL: the "
                      "time the trainer has to save its step when a pod is stopped")
  parser.add_argument("--xpk-cluster", default="", help="print or run the equivalent "
                      "`xpk workload create` on this xpk cluster instead of the manifest")
  launchlib.add_common_flags(parser)
  args = parser.parse_args(own)
  if args.num_slices < 1 or args.nodes < 1 or args.gpus_per_node < 1:
    raise launchlib.LaunchError(f"--num-slices {args.num_slices}, --nodes {args.nodes} and "
                                f"--gpus-per-node {args.gpus_per_node} must be 1 or more")
  if args.tpu_type:
    tpu_shape(args.tpu_type)  # an unknown type is an error now, not at scheduling
  launchlib.check_shared_workdir(launchlib.workdir_of(train_args), "pod")
  return args, train_args


def tpu_shape(tpu_type: str) -> tuple[str, str, int, int]:
  """(GKE accelerator label, topology, chips, hosts per slice) of a type such as v5litepod-16."""
  generation, _, size = tpu_type.rpartition("-")
  if generation not in TPU_ACCELERATORS or not size.isdigit():
    raise launchlib.LaunchError(f"--tpu-type {tpu_type}: expected <generation>-<size> with a "
                                f"generation of {', '.join(TPU_ACCELERATORS)}")
  label, per_chip = TPU_ACCELERATORS[generation]
  chips = int(size) // per_chip
  topologies = TOPOLOGIES_3D if per_chip == 2 else TOPOLOGIES_2D
  if chips not in topologies:
    raise launchlib.LaunchError(f"--tpu-type {tpu_type}: {chips} chips has no known topology "
                                f"(known chip counts: {', '.join(map(str, topologies))})")
  return label, topologies[chips], chips, max(1, chips // CHIPS_PER_TPU_HOST)


def shell_command(args, train_args: list[str]) -> str:
  """The container's command: the train command in the image's checkout (/app)."""
  train = launchlib.train_command(args.module, launchlib.with_slices(train_args, args.num_slices)
                                  if args.tpu_type else train_args)
  if args.gpu_type:
    return f"cd /app && . launch/gpu_env.sh && exec {train}"
  return f"cd /app && exec {train}"


def jobset(*, name: str, namespace: str, image: str, command: str, replicas: int, hosts: int,
           node_selector: dict, resources: dict, env: list, max_restarts: int,
           grace_seconds: int, annotations: dict, pod_extra: dict) -> dict:
  """THE template: a JobSet of `replicas` jobs x `hosts` pods, all running `command`."""
  pod = {
      "restartPolicy": "Never",  # a failure restarts the whole JobSet: every host resumes together
      "terminationGracePeriodSeconds": grace_seconds,
      "nodeSelector": node_selector,
      **pod_extra,
      "containers": [{
          "name": "train", "image": image,
          "command": ["bash", "-c", command],
          "env": env,
          "resources": {"limits": resources},
      }],
  }
  return {
      "apiVersion": "jobset.x-k8s.io/v1alpha2",
      "kind": "JobSet",
      "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
      "spec": {
          "failurePolicy": {"maxRestarts": max_restarts},
          # Stable pod DNS names: NAME-workers-<job>-<pod>.NAME (the GPU coordinator's address).
          "network": {"enableDNSHostnames": True},
          "replicatedJobs": [{
              "name": WORKERS,
              "replicas": replicas,
              "template": {"spec": {
                  "parallelism": hosts, "completions": hosts, "backoffLimit": 0,
                  "completionMode": "Indexed",
                  "template": {"spec": pod},
              }},
          }],
      },
  }


def render_manifest(args, train_args: list[str]) -> dict:
  """The JobSet for this run's accelerator: the template with the TPU or the GPU settings."""
  common = dict(name=args.name, namespace=args.namespace, image=args.image,
                command=shell_command(args, train_args), max_restarts=args.max_restarts,
                grace_seconds=args.grace_seconds)
  if args.tpu_type:
    label, topology, chips, hosts = tpu_shape(args.tpu_type)
    return jobset(
        **common, replicas=args.num_slices, hosts=hosts,
        node_selector={"cloud.google.com/gke-tpu-accelerator": label,
                       "cloud.google.com/gke-tpu-topology": topology},
        resources={"google.com/tpu": min(chips, CHIPS_PER_TPU_HOST)},
        env=[],
        # One slice per node pool, never two jobs sharing one (GKE multislice docs).
        annotations={"alpha.jobset.sigs.k8s.io/exclusive-topology":
                     "cloud.google.com/gke-nodepool"},
        pod_extra={"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet"})
  coordinator = f"{args.name}-{WORKERS}-0-0.{args.name}:{COORDINATOR_PORT}"
  index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
  return jobset(
      **common, replicas=1, hosts=args.nodes,
      node_selector={"cloud.google.com/gke-accelerator": args.gpu_type},
      resources={"nvidia.com/gpu": args.gpus_per_node},
      env=[{"name": "JAX_COORDINATOR_ADDRESS", "value": coordinator},
           {"name": "JAX_NUM_PROCESSES", "value": str(args.nodes)},
           {"name": "JAX_PROCESS_ID", "valueFrom": {"fieldRef": {"fieldPath": index}}},
           {"name": "FOUNDATION_GPUS", "value": str(args.nodes * args.gpus_per_node)}],
      annotations={}, pod_extra={})


def xpk_command(args, train_args: list[str]) -> list[str]:
  """The same run as `xpk workload create` (flags: github.com/AI-Hypercomputer/xpk,
  src/xpk/parser/workload.py)."""
  words = ["xpk", "workload", "create", f"--cluster={args.xpk_cluster}",
           f"--workload={args.name}", f"--docker-image={args.image}",
           f"--max-restarts={args.max_restarts}", "--restart-on-user-code-failure",
           f"--termination-grace-period-seconds={args.grace_seconds}"]
  if args.tpu_type:
    train = launchlib.train_command(args.module,
                                    launchlib.with_slices(train_args, args.num_slices))
    return [*words, f"--tpu-type={args.tpu_type}", f"--num-slices={args.num_slices}",
            f"--command=cd /app && {train}"]
  # xpk's pods carry JOB_INDEX, PROCESSES_IN_JOB, JOB_COMPLETION_INDEX and JAX_PROCESS_COUNT, and
  # pod 0 answers at WORKLOAD-slice-job-0-0.WORKLOAD (as xpk's own CPU workloads use them).
  rank = ("export JAX_NUM_PROCESSES=$JAX_PROCESS_COUNT "
          "JAX_PROCESS_ID=$((JOB_INDEX * PROCESSES_IN_JOB + JOB_COMPLETION_INDEX)) "
          f"JAX_COORDINATOR_ADDRESS={args.name}-slice-job-0-0.{args.name}:{COORDINATOR_PORT} "
          f"FOUNDATION_GPUS={args.nodes * args.gpus_per_node}")
  train = launchlib.train_command(args.module, train_args)
  return [*words, f"--device-type={args.gpu_type.removeprefix('nvidia-')}-{args.gpus_per_node}",
          f"--num-nodes={args.nodes}",
          f"--command={rank} && cd /app && . launch/gpu_env.sh && {train}"]


def to_yaml(manifest: dict) -> str:
  try:
    import yaml  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise launchlib.LaunchError("the manifest needs PyYAML: pip install pyyaml") from None
  return yaml.safe_dump(manifest, sort_keys=False, width=100)


def main(argv: list[str]) -> int:
  args, train_args = parse(argv)
  if args.xpk_cluster:
    command = xpk_command(args, train_args)
    if args.dry_run:
      print(launchlib.quote_words(command))
      return 0
    return launchlib.print_or_run("", command, False)
  return launchlib.print_or_run(to_yaml(render_manifest(args, train_args)),
                                ["kubectl", "apply", "-f", "-"], args.dry_run)


if __name__ == "__main__":
  launchlib.main_guard(main)
