"""What the cluster launchers share: the train command, the shared-workdir check, print-or-run.

Each launcher (tpu_vm.py, slurm.py, k8s.py) renders what it will execute -- a bash script, a
batch script or a manifest -- and either prints it (`--dry-run`) or runs it. The printed text is
the executed text, so a dry run shows exactly what would happen.
"""

import argparse
import shlex
import subprocess
import sys

# Exit code of `python -m foundation.train` after a SIGTERM: the step was saved, run it again.
EXIT_PREEMPTED = 75


class LaunchError(ValueError):
  """A launcher argument a user can fix; printed as one line."""


def split_train_args(argv: list[str]) -> tuple[list[str], list[str]]:
  """(launcher arguments, the trainer's arguments after '--')."""
  if "--" not in argv:
    return argv, []
  i = argv.index("--")
  return argv[:i], argv[i + 1:]


def workdir_of(train_args: list[str]) -> str:
  """The --workdir the trainer will get (either `--workdir X` or `--workdir=X`)."""
  for i, arg in enumerate(train_args):
    if arg == "--workdir" and i + 1 < len(train_args):
      return train_args[i + 1]
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
  raise LaunchError("the trainer's arguments after '--' need --workdir (every host writes the "
                    "same checkpoints there), e.g. -- --config configs/lm.py:size=1b "
                    "--workdir gs://BUCKET/runs/1b")


def check_shared_workdir(workdir: str, where: str) -> None:
  """Hosts that do not share a disk need a workdir all of them see: a bucket, or a shared mount."""
  if "://" in workdir or workdir.startswith("/"):
    return
  raise LaunchError(f"--workdir {workdir} is a relative path, on each {where}'s own disk; a "
                    f"multi-host run needs one workdir every host sees: gs://BUCKET/... or an "
                    f"absolute path on a shared mount")


def train_command(module: str, train_args: list[str], python: str = "python3") -> str:
  """The trainer's command line, quoted for a shell."""
  return quote_words([python, "-m", module, *train_args])


def with_slices(train_args: list[str], num_slices: int) -> list[str]:
  """Several TPU slices: the mesh's across-slice (dcn) axis is data, said explicitly so that a
  slice count the config cannot use fails at start-up; a command that sets a dcn_ degree itself
  is left as it is."""
  if num_slices == 1 or any(a.startswith("--config.mesh.dcn_") for a in train_args):
    return train_args
  return [*train_args, f"--config.mesh.dcn_data={num_slices}"]


def add_common_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--dry-run", action="store_true",
                      help="print exactly what would be executed, and execute nothing")
  parser.add_argument("--module", default="foundation.train",
                      help="the Python module every host runs (default foundation.train)")


def bash_script(lines: list[str]) -> str:
  """A strict bash script from its body lines."""
  return "\n".join(["#!/usr/bin/env bash", "set -euo pipefail", *lines]) + "\n"


def quote_words(words) -> str:
  """shlex.join, but `--flag=value` stays readable: only the value is quoted."""
  out = []
  for word in words:
    flag, eq, value = word.partition("=")
    if word.startswith("--") and eq and shlex.quote(flag) == flag:
      out.append(f"{flag}={shlex.quote(value)}")
    else:
      out.append(shlex.quote(word))
  return " ".join(out)


def print_or_run(text: str, argv: list[str], dry_run: bool) -> int:
  """--dry-run: prints `text` (stdout) and the command that would read it (stderr). Otherwise
  runs that command with `text` on its standard input, its output streaming to ours. Returns
  the exit code."""
  if dry_run:
    sys.stdout.write(text)
    print(f"# --dry-run: not executed; without it this runs: {shlex.join(argv)} "
          f"(the text above on its standard input)", file=sys.stderr)
    return 0
  return subprocess.run(argv, input=text, text=True, check=False).returncode


def print_or_run_script(script: str, dry_run: bool) -> int:
  """--dry-run: prints the bash script. Otherwise runs it as `bash -c SCRIPT`: not on bash's
  standard input, which the commands in it (ssh) would read and so eat the rest of the script."""
  if dry_run:
    sys.stdout.write(script)
    print("# --dry-run: not executed; without it this runs: bash -c '<the script above>'",
          file=sys.stderr)
    return 0
  return subprocess.run(["bash", "-c", script], check=False).returncode


def main_guard(main) -> None:
  """Runs main(argv); a LaunchError is one line and exit 2."""
  try:
    sys.exit(main(sys.argv[1:]))
  except LaunchError as e:
    print(f"launch error: {e}", file=sys.stderr)
    sys.exit(2)
