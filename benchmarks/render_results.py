r"""benchmarks/RESULTS.md table rows from result records of foundation.bench and the peer.

  python benchmarks/render_results.py OUT/125m.json OUT/1b.json [bench.json ...]

Each file holds one record or a list of them (benchmarks/gpu_session.sh writes lists). A JAX row's
peer is the one its own run measured (`--peer`), else the fastest peer of the same size, batch,
sequence and device among the files (their own and those the benches ran). Loss-curve records print as a verdict line each.
"""

import json
import sys

COLUMNS = ("config", "device", "variant", "batch x seq", "step ms", "tokens/s",
           "TFLOP/s per device", "MFU (PaLM)", "MFU (causal)", "MFU of measured matmul",
           "peer tokens/s", "ratio", "command")


def load(paths):
  records = []
  for path in paths:
    with open(path) as f:
      data = json.load(f)
    records += data if isinstance(data, list) else [data]
  return records


def _pct(d, key):
  return f"{d[key]:.1%}" if d else "n/a"


def variant(r: dict) -> str:
  if r["framework"] == "torch":
    return (f"HF Llama, sdpa, {r['precision']} ({r['dtype']}/{r['param_dtype']}), "
            f"compile {'on' if r['compiled'] else 'off'}")
  cublas = ", cuBLAS only" if "--xla_gpu_enable_triton_gemm=false" in r["xla_flags"] else ""
  return (f"{r['attention']}, scan {'on' if r['scan_layers'] else 'off'}, remat "
          f"{r['remat_policy']}, logits_chunk {r['logits_chunk']}, {r['dtype']}{cublas}")


def ratio(r: dict, peer: dict) -> float:
  """Ours over the peer's tokens/s: an own run's recorded ratio (with --rounds, the median of the
  alternated rounds), else the two records' tokens/s."""
  if peer is r.get("peer") and "ratio" in r:
    return r["ratio"]
  return r["tokens_per_sec"] / peer["tokens_per_sec"]


def best_peer(r: dict, speed: list) -> dict | None:
  """The peer its own run measured, else the fastest of the same shape and device."""
  own = r.get("peer")
  if own and "tokens_per_sec" in own:
    return own
  same = [p for p in speed if p["framework"] == "torch" and p.get("fits")
          and (p["size"], p["batch_size"], p["seq_len"], p["device_kind"])
          == (r["size"], r["batch_size"], r["seq_len"], r["device_kind"])]
  return max(same, key=lambda p: p["tokens_per_sec"], default=None)


def row(r: dict, speed: list) -> str:
  cells = [r["size"], r["device_kind"], variant(r), f"{r['batch_size']} x {r['seq_len']}"]
  if not r.get("fits"):
    cells += [f"does not fit: {r.get('error', '?')}"] + [""] * 8
  else:
    peer = best_peer(r, speed) if r["framework"] == "jax" else None
    cells += [f"{r['step_time']['median'] * 1e3:.1f}", f"{r['tokens_per_sec']:,.0f}",
              f"{r['tflops_per_device']['palm']:.3g}", _pct(r["mfu"], "palm"),
              _pct(r["mfu"], "causal"), _pct(r.get("mfu_of_matmul_ceiling"), "palm"),
              f"{peer['tokens_per_sec']:,.0f}" if peer else "",
              f"{ratio(r, peer):.2f}x" if peer else ""]
  cells.append(f"`{r['command']}`")
  return "| " + " | ".join(cells) + " |"


def main(paths):
  records = load(paths)
  speed = [r for r in records if r.get("framework") in ("jax", "torch")]
  # A peer that a bench ran (--peer) gets its own row, after the bench's.
  speed = [x for r in speed for x in [r] + ([r["peer"]] if "params" in r.get("peer", {}) else [])]
  if speed:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + " --- |" * len(COLUMNS))
    for r in speed:
      print(row(r, speed))
  for r in speed:
    b = r.get("breakdown")
    if b and "ms_per_step" in b:
      parts = ", ".join(f"{k} {v:.1f}" for k, v in b["ms_per_step"].items())
      print(f"breakdown {r['size']} ({variant(r)}), ms per step: {parts}; idle "
            f"{b['idle_ms']:.1f} of {r['step_time']['median'] * 1e3:.1f}")
  for r in records:
    if "comparison" in r:
      c = r["comparison"]
      print(f"loss curve {r['size']} ({' '.join(r['fast_overrides'])} vs "
            f"{' '.join(r['reference_overrides']) or 'the config'}), {r['steps']} steps: "
            f"{'PASS' if r['passed'] else 'FAIL'}, max relative difference "
            f"{c['max_rel_diff']:.2e} (rtol {r['rtol']:.0e})"
            + (f", bf16 vs float32 reference {r['yardstick']['max_rel_diff']:.2e}"
               if r.get("yardstick") else "") + f"; `{r['command']}`")


if __name__ == "__main__":
  main(sys.argv[1:])
