"""Renders docs/scaling.md from the fit-check reports (fit_table.sh): each large size's defaults in
benchmarks/results/fit-*.json, then the hand-tuned settings of benchmarks/fit/*.json."""

import glob
import json
import os

GiB = 1024 ** 3
HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = {"1b": 0, "3b": 1, "7b": 2, "13b": 3, "70b": 4}


def row(r: dict) -> str:
  b = {k: v / GiB for k, v in r["bytes"].items()}
  if r.get("compiler_refused"):
    return (f"| {r['size']} | `{r['topology']}` | {r['layout']} | {r['remat_policy']} | "
            f"{r['batch_size']} x {r['seq_len']} | {b['params']:.2f} | {b['optimizer_state']:.2f} "
            f"| - | - | does not fit: {r['compiler_refused']} | - |")
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
  hbm = r["hbm_bytes"] / GiB
  verdict = (f"fits ({hbm - b['total']:.1f} GiB free)" if r["fits"]
             else f"does not fit, by {b['total'] - hbm:.1f} GiB")
  return (f"| {r['size']} | `{r['topology']}` ({r['devices']} chips, {hbm:.0f} GiB) | {mesh} | "
          f"{r['remat_policy']} | {r['batch_size']} x {r['seq_len']} | {b['params']:.2f} | "
          f"{b['optimizer_state']:.2f} | {b['temporaries']:.2f} | {b['total']:.2f} | {verdict} | "
          f"{r['model_flops_per_step'] / r['devices']:.3g} |")


def defaults_row(r: dict) -> str:
  """A size's defaults on one slice: the global batch, how it is split, and the per-chip total."""
  hbm = r["hbm_bytes"] / GiB
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
  micro = r["batch_size"] // r["grad_accum"]
  if r.get("compiler_refused"):
    memory, verdict = f"- / {hbm:.0f}", f"no: {r['compiler_refused']}"
  else:
    total = r["bytes"]["total"] / GiB
    memory = f"{total:.2f} / {hbm:.0f}"
    verdict = f"yes ({hbm - total:.1f} GiB free)" if r["fits"] else "no"
  return (f"| {r['size']} | `{r['topology']}` ({r['devices']} chips) | {mesh} | "
          f"{r['batch_size']} x {r['seq_len']} | {r['grad_accum']} x {micro} rows | "
          f"{r['remat_policy']} | {r.get('logits_chunk', '?')} | {memory} | {verdict} |")


def load(pattern: str) -> list[dict]:
  """The reports, by size, then (defaults: fit-7b before fit-7b-v5p) by file name length and chip."""
  paths = sorted(glob.glob(os.path.join(HERE, pattern)), key=len)
  reports = [json.load(open(p)) for p in paths]
  return sorted(reports, key=lambda r: (ORDER.get(r["size"], 9),) + (
      () if pattern.startswith("results") else (r["device_kind"], r["devices"])))


def main():
  defaults = load("results/fit-*.json")
  reports = load("fit/*.json")
  print(HEADER)
  for r in defaults:
    print(defaults_row(r))
  print("\nCommands (run from the repository root with the libtpu environment):\n")
  for r in defaults:
    print(f"- `{r['command']}`")
  print(HAND_TUNED)
  for r in reports:
    print(row(r))
  print("\nCommands. They were run when every size's defaults were grad_accum=1, fsdp=-1 and "
        "tensor=1;\nto repeat a row now add `--config.grad_accum=1 --config.mesh.fsdp=-1 "
        "--config.mesh.tensor=1`\n(70b on v5e: `--config.grad_accum=1`), as fit_table.sh does:\n")
  for r in reports:
    print(f"- `{r['command']}`")
  if reports:
    print(f"\nSoftware: jax {reports[0].get('jax', '?')}, libtpu {reports[0].get('libtpu', '?')}.")
  print(MEMORY_LEVERS)


HEADER = """# Scaling: will it fit?

`python -m foundation.compile` compiles the sharded train step ahead of time for a real TPU topology
on a CPU-only machine (libtpu from PyPI describes the chips; no TPU is attached) and reads the
compiler's own memory analysis. Each row below was produced by that command; the exact command is
under its table. Regenerate all rows with `bash benchmarks/fit_table.sh` (set-up in its header).

## Each size's defaults

`--config configs/lm.py:size=NAME` with nothing else set starts on the smallest slice this page
lists for NAME: the fewest chips, and of those the least HBM per chip (3b, not in the hand-tuned
table, is given 1b's). The defaults keep each size's global batch (configs/lm.py `RUNS`) and split
it into `grad_accum` micro-batches small enough for the chip, with `remat_policy=full` and the
logits made a chunk of positions at a time; `mesh.fsdp=-1` fills the slice (70b also sets
`mesh.tensor=8`). The second 7b row is the slice where the old defaults (remat none, the whole
batch in one step) were refused: 2.07T bytes of temporaries per chip, 95.74G of HBM. The per-chip total is the
compiler's (arguments, outputs not aliased, temporaries, code), in GiB.
tests/test_compile.py fails when a default in configs/lm.py no longer matches its recorded row
(benchmarks/results/fit-NAME.json): change a default, re-run its command.

| size | topology | mesh | global batch x seq | grad_accum x micro-batch | remat | logits chunk | per-chip total / HBM GiB | fits |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |"""

HAND_TUNED = """
On a bigger slice the same defaults put fewer rows on each chip (not compiled here). A slice with
more data-parallel ways than a micro-batch has rows refuses to start (`batch_size=... is not divisible
by grad_accum=... micro-batches x the data-parallel degree ...`): lower `--config.grad_accum`.
Of the slices in the table below, only 70b's 512-chip ones need it (fsdp=64 x tensor=8 there):
`--config.grad_accum=16`, 64-row micro-batches.

## Hand-tuned settings per slice

Settings given on the command line for each slice, one step without gradient accumulation.

Bytes are per chip. *Params* and *optimizer state* are the chip's shard of the float32 master
weights and Adam moments; *temporaries* are activations, gradients and scratch as the compiler laid
them out; *total* adds the arguments (params, optimizer state, batch), outputs not aliased onto
their donated inputs, and code. FLOPs per chip per step are the model FLOPs (PaLM formula) divided
by the chips; the compiler's own count sees a scanned layer once, so it is not shown.

| size | topology | mesh | remat | batch x seq | params GiB | opt state GiB | temporaries GiB | total GiB | verdict | model FLOPs per chip per step |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"""


# Measured with `python -m pytest -q -s tests/test_memory.py` (8 simulated CPU devices, the test
# file's d_model=256 / 4 layers / vocab 2048 model, batch 32 x 256; jax 0.10.2), 2026-11-23.
MEMORY_LEVERS = """
## Memory levers, measured

The compiler's memory analysis of the train step on this machine's 8 (simulated) CPU devices, per
device, for a small model (d_model 256, 4 layers, vocab 2048, batch 32 x 256), from
`python -m pytest -q -s tests/test_memory.py`, which asserts the direction of each:

| lever | setting | per-device MiB |
| --- | --- | --- |
| remat (temporaries, fsdp=8) | none / minimal / dots / full | 260.5 / 138.5 / 102.5 / 74.5 |
| FSDP (params + Adam moments) | data=8 / fsdp=8 | 19.0 + 38.0 / 2.4 + 4.8 |
| chunked cross-entropy (temporaries, vocab 8192, remat full) | whole logits / 32 positions at a time | 90.4 / 74.2 |
"""


if __name__ == "__main__":
  main()
