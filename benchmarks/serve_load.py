r"""Load test of python -m foundation.serve on loopback: batched vs one request at a time.

  python benchmarks/serve_load.py --workdir runs/tiny            # 64 clients, 64 tokens each

Starts the server twice on 127.0.0.1 (a free port each time), on the same model and the same
requests (greedy, distinct prompts cut from the standard library's sources):

  batched:        --slots CLIENTS; all CLIENTS streaming clients start at once.
  one at a time:  --slots 1; the same requests one after another (what a server without batching
                  does: each decode step serves one request).

Every answer of the batched run must equal the one-at-a-time answer of the same prompt (greedy
output does not depend on what runs beside it), or the script exits 1. It records tokens/s, p50
and p99 of the request latency and of the time to the first token, and writes them to
benchmarks/results/serve_load.json (docs/serving.md quotes them). Bounded: each request times out
after --timeout seconds and the servers are stopped at the end (SIGTERM, then kill).
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prompts(count: int, length: int) -> list[str]:
  """Distinct prompts: lines of this machine's standard library sources (no download)."""
  import glob  # pylint: disable=g-import-not-at-top
  out = []
  for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        line = line.strip()
        if len(line) >= 12 and line not in out:
          out.append(line[:length])
          break
    if len(out) == count:
      return out
  raise SystemExit(f"found only {len(out)} prompts")


def start_server(workdir: str, slots: int, max_tokens: int):
  env = {**os.environ, "PYTHONPATH": ROOT}
  process = subprocess.Popen(
      [sys.executable, "-m", "foundation.serve", "--workdir", workdir, "--port", "0",
       "--slots", str(slots), "--max-tokens", str(max_tokens), "--queue", "1024"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  while True:
    line = process.stdout.readline()
    if not line:
      raise SystemExit("the server did not start:\n" + "".join(lines[-20:]))
    lines.append(line)
    match = re.search(r"serving on (http://\S+)", line)
    if match:
      threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
      return process, match.group(1), "".join(lines)


def stop_server(process) -> None:
  process.send_signal(signal.SIGTERM)
  try:
    process.wait(timeout=60)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()


def one_request(url: str, model: str, prompt: str, max_tokens: int, timeout: float) -> dict:
  """One streaming completion over a plain HTTP connection (a light client: the measurement is
  of the server, and the clients share this machine's cores with it)."""
  host = url.split("//")[1]
  started = time.monotonic()
  connection = http.client.HTTPConnection(host, timeout=timeout)
  body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                     "temperature": 0, "stream": True,
                     "stream_options": {"include_usage": True}})
  connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
  response = connection.getresponse()
  if response.status != 200:
    raise SystemExit(f"HTTP {response.status}: {response.read()[:300]!r}")
  first, text, finish, tokens = None, "", None, 0
  for line in response:
    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
      continue
    chunk = json.loads(line[6:])
    if chunk.get("usage"):
      tokens = chunk["usage"]["completion_tokens"]
    for choice in chunk["choices"]:
      if first is None and choice["text"]:
        first = time.monotonic() - started
      text += choice["text"]
      finish = choice["finish_reason"] or finish
  connection.close()
  return {"text": text, "tokens": tokens, "latency": time.monotonic() - started,
          "first_token": first, "finish": finish}


def model_name(url: str) -> str:
  with urllib.request.urlopen(url + "/v1/models", timeout=30) as response:
    return json.load(response)["data"][0]["id"]


def run(workdir, slots, requests, max_tokens, concurrent_clients, timeout):
  process, url, banner = start_server(workdir, slots, max_tokens)
  try:
    model = model_name(url)
    ask = lambda p: one_request(url, model, p, max_tokens, timeout)
    one_request(url, model, requests[0], 4, timeout)  # a first request outside the measurement
    started = time.monotonic()
    if concurrent_clients > 1:
      with concurrent.futures.ThreadPoolExecutor(concurrent_clients) as pool:
        results = list(pool.map(ask, requests))
    else:
      results = [ask(p) for p in requests]
    wall = time.monotonic() - started
  finally:
    stop_server(process)
  latency = np.array([r["latency"] for r in results])
  first = np.array([r["first_token"] or r["latency"] for r in results])
  tokens = sum(r["tokens"] for r in results)
  summary = {
      "slots": slots, "clients": concurrent_clients, "requests": len(requests),
      "tokens": int(tokens), "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
      "latency_p50_s": round(float(np.percentile(latency, 50)), 3),
      "latency_p99_s": round(float(np.percentile(latency, 99)), 3),
      "first_token_p50_s": round(float(np.percentile(first, 50)), 3),
      "first_token_p99_s": round(float(np.percentile(first, 99)), 3),
      "server": next((l for l in banner.splitlines() if " slots, " in l), "")}
  return summary, results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "tiny"))
  parser.add_argument("--clients", type=int, default=64)
  parser.add_argument("--max-tokens", type=int, default=64)
  parser.add_argument("--prompt-chars", type=int, default=40)
  parser.add_argument("--timeout", type=float, default=600)
  parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results",
                                                       "serve_load.json"))
  args = parser.parse_args()
  if not os.path.exists(os.path.join(args.workdir, "config.json")):
    raise SystemExit(f"--workdir {args.workdir}: no config.json; train the demo model first "
                     f"(README Quick start)")
  requests = prompts(args.clients, args.prompt_chars)
  batched, batched_results = run(args.workdir, args.clients, requests, args.max_tokens,
                                 args.clients, args.timeout)
  print("batched:", json.dumps(batched), flush=True)
  single, single_results = run(args.workdir, 1, requests, args.max_tokens, 1, args.timeout)
  print("one at a time:", json.dumps(single), flush=True)
  mismatched = [i for i, (a, b) in enumerate(zip(batched_results, single_results))
                if a["text"] != b["text"]]
  result = {
      "what": f"{args.clients} streaming clients, {args.max_tokens} greedy tokens each, "
              f"on loopback",
      "workdir": args.workdir,
      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
                 f"{os.getloadavg()[0]:.1f}",
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "batched": batched, "one_at_a_time": single,
      "speedup_tokens_per_s": round(batched["tokens_per_s"] / single["tokens_per_s"], 2),
      "all_answers_equal": not mismatched,
      "finished": sum(r["finish"] in ("length", "stop") for r in batched_results)}
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  print(f"speedup {result['speedup_tokens_per_s']}x, {result['finished']}/{args.clients} "
        f"finished, answers equal: {not mismatched}; written to {args.output}")
  if mismatched:
    print(f"answers differ for prompts {mismatched[:10]}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
