"""Renders docs/scaling.md from the fit-check reports in benchmarks/fit/*.json (fit_table.sh)."""

import glob
import json
import os

GiB = 1024 ** 3
HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = {"1b": 0, "7b": 1, "13b": 2, "70b": 3}


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


def main():
  reports = [json.load(open(p)) for p in glob.glob(os.path.join(HERE, "fit", "*.json"))]
  reports.sort(key=lambda r: (ORDER.get(r["size"], 9), r["device_kind"], r["devices"]))
  print("""# Scaling: will it fit?

`python -m foundation.compile` compiles the sharded train step ahead of time for a real TPU topology
on a CPU-only machine (libtpu from PyPI describes the chips; no TPU is attached) and reads the
compiler's own memory analysis. Each row below was produced by that command; the exact command is
under the table. Regenerate all rows with `bash benchmarks/fit_table.sh` (set-up in its header).

Bytes are per chip. *Params* and *optimizer state* are the chip's shard of the float32 master
weights and Adam moments; *temporaries* are activations, gradients and scratch as the compiler laid
them out; *total* adds the arguments (params, optimizer state, batch), outputs not aliased onto
their donated inputs, and code. FLOPs per chip per step are the model FLOPs (PaLM formula) divided
by the chips; the compiler's own count sees a scanned layer once, so it is not shown.

| size | topology | mesh | remat | batch x seq | params GiB | opt state GiB | temporaries GiB | total GiB | verdict | model FLOPs per chip per step |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |""")
  for r in reports:
    print(row(r))
  print("\nCommands (run from the repository root with the libtpu environment):\n")
  for r in reports:
    print(f"- `{r['command']}`")
  if reports:
    print(f"\nSoftware: jax {reports[0].get('jax', '?')}, libtpu {reports[0].get('libtpu', '?')}.")
  print(MEMORY_LEVERS)


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
