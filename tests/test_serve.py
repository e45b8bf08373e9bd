"""The HTTP server (python -m foundation.serve) as a user meets it: one real server process on
127.0.0.1, driven by the real `openai` client, raw HTTP for bad input, and a headless Chromium for
the Q&A page. The greedy tokens are compared with foundation.generate's."""

import concurrent.futures
import dataclasses
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import ml_collections
import openai
import pytest

from configs import finetune as finetune_configs
from configs import lm
from foundation import generate
from foundation import train
from foundation.data import sft
from foundation.data import tokenizers
from foundation.serve import keys as keys_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
LORA_STEPS = 20
CAP_TOKENS, CAP_N, CAP_BODY = 100, 3, 4096


def set_fields(config, **changes):
  with config.unlocked():
    for dotted, value in changes.items():
      node, *path = [config] + dotted.split(".")
      for part in path[:-1]:
        node = node[part]
      node[path[-1]] = value
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """The size=test LM, a few steps on the embedded Python sources (context 128 tokens)."""
  path = str(tmp_path_factory.mktemp("serve") / "base")
  config = set_fields(lm.get_config("size=test"), **{
      "steps": STEPS, "eval.every": 0, "checkpoint.every": STEPS, "log.every": STEPS,
      "log.generate_tokens": 0})
  train.train(config, path)
  return path


@pytest.fixture(scope="module")
def lora_workdir(workdir, tmp_path_factory):
  """A LoRA SFT run of the base (configs/finetune.py:...,lora) on generated Python-function chats."""
  folder = tmp_path_factory.mktemp("sft")
  chats = folder / "chat.jsonl"
  chats.write_text("".join(json.dumps(r) + "\n" for r in sft.python_function_records(64, seed=0)))
  config = set_fields(finetune_configs.get_config(f"task=sft,base={workdir},lora"), **{
      "steps": LORA_STEPS, "seq_len": 128, "sft.train_path": str(chats), "eval.every": 0,
      "checkpoint.every": LORA_STEPS, "log.every": LORA_STEPS, "optim.warmup_steps": 2,
      "optim.lr": 3e-2})
  path = str(folder / "run")
  train.train(config, path)
  return path


def run_module(*args, **kwargs):
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
  """Two keys made by the real CLI: 'dev' (no limit) and 'slow' (2 requests a minute)."""
  path = str(tmp_path_factory.mktemp("keys") / "keys.txt")
  made = {}
  for name, rpm in (("dev", "0"), ("slow", "2")):
    result = run_module("foundation.serve.keys", "add", "--file", path, "--name", name,
                        "--rpm", rpm)
    assert result.returncode == 0, result.stderr
    made[name] = result.stdout.strip()
  with open(path) as f:
    stored = f.read()
  assert made["dev"] not in stored and keys_lib.hash_key(made["dev"]) in stored
  return path, made


class Server:
  def __init__(self, process, url, lines):
    self.process, self.url, self.lines = process, url, lines

  def client(self, key):
    return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

  def raw(self, path, body=None, key=None, method=None, headers=None):
    """(status, headers, body text) of one plain HTTP request."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(self.url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key:
      request.add_header("Authorization", f"Bearer {key}")
    for name, value in (headers or {}).items():
      request.add_header(name, value)
    try:
      with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as e:
      return e.code, e.headers, e.read().decode()

  def metric(self, name):
    _, _, text = self.raw("/metrics")
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


@pytest.fixture(scope="module")
def server(workdir, lora_workdir, keys, loaded):
  """One server for the module: 2 CPU devices (the slots split over them), 4 slots, small caps.
  The test process loads its own copy of the model meanwhile (`session`)."""
  env = {**os.environ, "PYTHONPATH": ROOT,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  process = subprocess.Popen(
      [sys.executable, "-m", "foundation.serve", "--workdir", workdir, "--port", "0",
       "--api-keys", keys[0], "--adapters", f"sft={lora_workdir}", "--slots", "4", "--max-tokens", str(CAP_TOKENS),
       "--max-n", str(CAP_N), "--max-body-bytes", str(CAP_BODY), "--drain-timeout", "60"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  loaded.append(generate.load(workdir))
  loaded.append(generate.load(lora_workdir))  # the adapters merged in, as generate serves it
  lines = []
  url = None
  deadline = time.monotonic() + 240
  while url is None and time.monotonic() < deadline:
    line = process.stdout.readline()
    if not line:
      break
    lines.append(line)
    match = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
    url = match.group(1) if match else None
  assert url, "".join(lines[-30:])
  threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
  yield Server(process, url, lines)
  if process.poll() is None:
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def loaded():
  return []


@pytest.fixture(scope="module")
def session(server, loaded):
  """The model as foundation.generate loads it (8 CPU devices), for the reference tokens."""
  return loaded[0]


@pytest.fixture(scope="module")
def tuned(server, loaded):
  return loaded[1]


PROMPTS = ["def ", "import os\nimport sys\n", "class Point:\n    def __init__(self, x, y):\n",
           "# Copyright", "for i in range(10):\n    print(", "x = [", "return self.", "if __name__"]


def test_completions_chat_and_streams_give_generates_greedy_tokens(server, keys, session):
  client = server.client(keys[1]["dev"])
  assert [m.id for m in client.models.list().data] == ["base", "sft"]
  for prompt in (PROMPTS[0], PROMPTS[3]):
    expected = session.generate([prompt], max_new_tokens=24)[0]
    got = client.completions.create(model="base", prompt=prompt, max_tokens=24, temperature=0)
    assert got.choices[0].text == expected, prompt
    assert got.usage.prompt_tokens == len(session.encode_prompt(prompt))
    chunks = list(client.completions.create(model="base", prompt=prompt, max_tokens=24,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert len(chunks) > 3 and chunks[-1].choices[0].finish_reason in ("length", "stop")
  # Chat: the model's own template (a base model: the plain User/Assistant transcript).
  messages = [{"role": "system", "content": "You write Python."},
              {"role": "user", "content": "a function that adds"}]
  template = generate.ChatTemplate.of(session.config, session.tokenizer)
  ids = template.prompt_ids(messages)
  assert session.tokenizer.decode(ids).endswith("User: a function that adds\nAssistant:")
  raw = session.tokenizer.decode(session.generate_ids([ids], max_new_tokens=20)[0])
  expected = raw.split("\nUser:")[0]
  reply = client.chat.completions.create(model="base", messages=messages, max_tokens=20,
                                         temperature=0)
  assert reply.choices[0].message.content == expected
  stream = client.chat.completions.create(model="base", messages=messages, max_tokens=20,
                                          temperature=0, stream=True)
  assert "".join(c.choices[0].delta.content or "" for c in stream) == expected


def test_greedy_output_is_the_same_alone_and_batched_with_others(server, keys):
  """8 greedy prompts and 4 sampled ones at once over 4 slots (requests join and leave between
  steps): each greedy answer is the one it gets alone, none holds another request's text."""
  client = server.client(keys[1]["dev"])

  def ask(prompt, temperature=0.0, seed=None):
    return client.completions.create(model="base", prompt=prompt, max_tokens=30,
                                     temperature=temperature, seed=seed).choices[0].text

  alone = [ask(p) for p in PROMPTS]
  assert len(set(alone)) > 1  # the prompts lead to different answers
  with concurrent.futures.ThreadPoolExecutor(12) as pool:
    greedy = [pool.submit(ask, p) for p in PROMPTS]
    sampled = [pool.submit(ask, p, 1.0, 7) for p in PROMPTS[:4]]
    assert [f.result() for f in greedy] == alone
    sampled = [f.result() for f in sampled]
  # A seeded sampled request gives the same text whatever ran beside it.
  assert [ask(p, 1.0, 7) for p in PROMPTS[:4]] == sampled


def test_sampling_options(server, keys, session):
  client = server.client(keys[1]["dev"])
  greedy = client.completions.create(model="base", prompt="def ", max_tokens=20, temperature=0)
  # top_k=1 leaves only the most likely token: sampling at any temperature is then greedy.
  top1 = client.completions.create(model="base", prompt="def ", max_tokens=20, temperature=1.5,
                                   extra_body={"top_k": 1}, seed=3)
  assert top1.choices[0].text == greedy.choices[0].text
  three = client.completions.create(model="base", prompt="def ", max_tokens=20, temperature=1.0,
                                    top_p=0.9, n=3, seed=11)
  assert [c.index for c in three.choices] == [0, 1, 2] and three.usage.completion_tokens > 20
  again = client.completions.create(model="base", prompt="def ", max_tokens=20, temperature=1.0,
                                    top_p=0.9, n=3, seed=11)
  assert [c.text for c in again.choices] == [c.text for c in three.choices]
  assert len({c.text for c in three.choices}) > 1
  # stop: the text ends before the first stop string, finish_reason 'stop'.
  text = greedy.choices[0].text
  stop = text[5:7]
  cut = client.completions.create(model="base", prompt="def ", max_tokens=20, temperature=0,
                                  stop=[stop])
  assert cut.choices[0].text == text[:text.find(stop)]
  assert cut.choices[0].finish_reason == "stop"
  streamed = client.completions.create(model="base", prompt="def ", max_tokens=20, temperature=0,
                                       stop=stop, stream=True)
  assert "".join(c.choices[0].text for c in streamed) == text[:text.find(stop)]


def with_task(session, task):
  config = session.config.copy_and_resolve_references()
  with config.unlocked():
    config.task = task
  return dataclasses.replace(session, config=config)


def test_interactive_chat_uses_the_sft_template_a_fine_tune_was_trained_with(session):
  """generate --interactive and the API share generate.ChatTemplate: an SFT workdir's turns are
  its training template (before: the plain User/Assistant transcript, which an SFT model never
  saw)."""
  sft_session = with_task(session, "sft")
  chat = generate.Chat(sft_session, reply_tokens=20)  # the first test's compiled shapes
  assert chat.template.kind == "sft"
  chat.send("a function that adds")
  assert chat.last_prompt == sft.chat_prompt_ids(
      session.tokenizer, [{"role": "user", "content": "a function that adds"}])
  assert generate.Chat(session, reply_tokens=20).template.kind == "plain"


def test_an_imported_models_template_comes_from_its_tokenizer_config(tmp_path):
  files = tokenizers.byte_tokenizer_files()
  sidecar = json.loads(files["tokenizer_config.json"])
  sidecar["chat_template"] = (
      "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
      "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
  files["tokenizer_config.json"] = json.dumps(sidecar).encode()
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  tok = tokenizers.HFTokenizer(str(tmp_path / "tokenizer.json"))
  template = generate.ChatTemplate.of(ml_collections.ConfigDict({"task": "lm"}), tok)
  assert template.kind == "hf" and template.stop_texts == ()
  ids = template.prompt_ids([{"role": "user", "content": "hi"}])
  assert ids[0] == tok.bos_id and tok.decode(ids) == "[user] hi\n[assistant] "
  # A fine-tune of it was trained with the SFT template, which wins.
  assert generate.ChatTemplate.of(ml_collections.ConfigDict({"task": "sft"}), tok).kind == "sft"


def test_a_lora_fine_tune_is_served_beside_its_base(server, keys, session, tuned):
  """--adapters sft=WORKDIR: chosen per request by `model`, in its SFT chat template; its answer
  is what foundation.generate gives on the LoRA workdir (adapters merged), the base's stays the
  base's, also when both run at once."""
  client = server.client(keys[1]["dev"])
  messages = [{"role": "user", "content": "a function that adds"}]
  template = generate.ChatTemplate.of(tuned.config, tuned.tokenizer)
  assert template.kind == "sft"
  ids = template.prompt_ids(messages)
  tuned_text = tuned.tokenizer.decode(tuned.generate_ids([ids], max_new_tokens=20)[0])
  base_text = session.tokenizer.decode(session.generate_ids([ids], max_new_tokens=20)[0])
  assert tuned_text != base_text  # the adapter changes the answer

  def chat():
    return client.chat.completions.create(model="sft", messages=messages, max_tokens=20,
                                          temperature=0).choices[0].message.content

  def complete(model):
    return client.completions.create(model=model, prompt=ids, max_tokens=20,
                                     temperature=0).choices[0].text

  assert chat() == tuned_text
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    runs = [pool.submit(complete, "base"), pool.submit(chat), pool.submit(complete, "sft"),
            pool.submit(complete, "base")]
    assert [r.result() for r in runs] == [base_text, tuned_text, tuned_text, base_text]
  result = run_module("foundation.serve", "--workdir", "unused", "--adapters", "x=/no/such/run")
  assert result.returncode == 2 and "--adapters x=/no/such/run: no config.json" in result.stderr


def one_line_error(status, body, expected_status, field):
  assert status == expected_status, body
  assert body.count("\n") == 0 or body.endswith("\n") and body.count("\n") == 1, body
  error = json.loads(body)["error"]
  assert error["param"] == field, error
  return error["message"]


def test_keys_rate_limits_and_the_host_rule(server, keys):
  status, _, body = server.raw("/v1/models")
  one_line_error(status, body, 401, "authorization")
  status, _, body = server.raw("/v1/completions", {"prompt": "x"}, key="sk-not-a-key")
  assert "not valid" in one_line_error(status, body, 401, "authorization")
  with pytest.raises(openai.AuthenticationError):
    server.client("sk-wrong").completions.create(model="base", prompt="x", max_tokens=2)
  # 'slow' may make 2 requests a minute: the third is refused with Retry-After.
  slow = keys[1]["slow"]
  for _ in range(2):
    assert server.raw("/v1/models", key=slow)[0] == 200
  status, headers, body = server.raw("/v1/completions", {"prompt": "x"}, key=slow)
  assert status == 429 and 1 <= int(headers["Retry-After"]) <= 30, body
  assert "2 requests per minute" in json.loads(body)["error"]["message"]
  # Without keys the server listens on loopback only; another address needs --api-keys.
  result = run_module("foundation.serve", "--workdir", "unused", "--host", "0.0.0.0")
  assert result.returncode == 2
  assert "--host 0.0.0.0: listening beyond this machine needs --api-keys" in result.stderr


@pytest.mark.parametrize("path, body, status, field, says", [
    ("/v1/completions", b'{"prompt": "x", ', 400, "body", "not valid JSON"),
    ("/v1/completions", b'["x"]', 400, "body", "must be a JSON object"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "'gpt-4' is not served"),
    ("/v1/completions", {"prompt": "x" * 200}, 400, "prompt", "over this server's limit of 127"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 101}, 400, "max_tokens", "cap of 100"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "positive integer"),
    ("/v1/completions", {"prompt": "x", "n": 4}, 400, "n", "over this server's cap of 3"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature", "[0, 2]"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("/v1/completions", {"prompt": "x", "top_k": -1}, 400, "top_k", "at least 0"),
    ("/v1/completions", {"prompt": "x", "seed": "a"}, 400, "seed", "integer"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, 400, "stop", "string"),
    ("/v1/completions", {"prompt": [5, 99999]}, 400, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt", "string or a list of token ids"),
    ("/v1/completions", {"prompt": "x" * 5000}, 413, "body", "over this server's limit of 4096"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, 400,
     "messages[0].role", "system, user or assistant"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", "string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 150}]}, 400,
     "messages", "over this server's limit"),
])
def test_bad_input_is_a_one_line_error_naming_the_field(server, keys, path, body, status, field,
                                                          says):
  got_status, _, text = server.raw(path, body, key=keys[1]["dev"])
  assert says in one_line_error(got_status, text, status, field)


def test_a_body_over_the_limit_without_content_length(server, keys):
  """A chunked body is counted as it arrives."""
  connection = http.client.HTTPConnection(server.url.split("//")[1], timeout=30)
  connection.putrequest("POST", "/v1/completions")
  connection.putheader("Authorization", f"Bearer {keys[1]['dev']}")
  connection.putheader("Transfer-Encoding", "chunked")
  connection.endheaders()
  for _ in range(3):
    chunk = b'{"prompt": "' + b"x" * 2000
    connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
  connection.send(b"0\r\n\r\n")
  response = connection.getresponse()
  one_line_error(response.status, response.read().decode(), 413, "body")
  connection.close()


def test_a_client_that_disconnects_frees_its_slot(server, keys):
  before = server.metric("foundation_cancelled_requests")
  connection = http.client.HTTPConnection(server.url.split("//")[1], timeout=30)
  body = json.dumps({"prompt": "def ", "max_tokens": CAP_TOKENS, "temperature": 0,
                     "stream": True})
  connection.request("POST", "/v1/completions", body, {
      "Authorization": f"Bearer {keys[1]['dev']}", "Content-Type": "application/json"})
  response = connection.getresponse()
  assert response.status == 200
  assert response.readline().startswith(b"data: ")
  connection.sock.shutdown(2)
  connection.close()
  deadline = time.monotonic() + 10
  while server.metric("foundation_cancelled_requests") == before and time.monotonic() < deadline:
    time.sleep(0.02)
  assert server.metric("foundation_cancelled_requests") == before + 1
  assert json.loads(server.raw("/health")[2])["running"] == 0
  # The slot serves the next request.
  client = server.client(keys[1]["dev"])
  assert client.completions.create(model="base", prompt="x", max_tokens=3).usage.completion_tokens


def test_metrics_count_requests_tokens_and_the_batch(server):
  _, headers, text = server.raw("/metrics")
  assert headers["Content-Type"].startswith("text/plain")
  for name in ("foundation_requests_total{route=\"completions\",status=\"200\"}",
               "foundation_completion_tokens_total", "foundation_queue_length",
               "foundation_batch_occupancy", "foundation_request_seconds_bucket",
               "foundation_first_token_seconds_count"):
    assert name in text, name
  assert server.metric("foundation_completion_tokens_total") > 100
  assert 0 < server.metric("foundation_batch_occupancy") <= 1
  assert json.loads(server.raw("/health")[2])["status"] == "ok"


def chromium_driver():
  """A headless Chromium through Selenium and Debian's chromedriver, or a skip naming what is
  missing (.ci/run installs both)."""
  chromedriver = shutil.which("chromedriver")
  browser = shutil.which("chromium") or shutil.which("chromium-browser")
  if not (chromedriver and browser):
    pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run: apt-get "
                "install -y chromium chromium-driver)")
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = browser
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
    options.add_argument(flag)
  return webdriver.Chrome(service=Service(chromedriver), options=options)


def test_the_page_streams_an_answer_in_a_real_browser(server, keys):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.keys import Keys  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  key = keys[1]["dev"]
  expected = server.client(key).chat.completions.create(
      model="base", messages=[{"role": "user", "content": "What is a list?"}], max_tokens=24,
      temperature=0).choices[0].message.content
  driver = chromium_driver()
  try:
    driver.get(server.url + "/")
    field = driver.find_element(By.ID, "key")
    field.send_keys(key)
    field.send_keys(Keys.TAB)  # 'change': the page keeps the key and lists the models
    WebDriverWait(driver, 30).until(
        lambda d: [o.text for o in d.find_elements(By.CSS_SELECTOR, "#model option")] ==
        ["base", "sft"])
    for name, value in (("temperature", "0"), ("max_tokens", "24")):
      element = driver.find_element(By.ID, name)
      element.clear()
      element.send_keys(value)
    question = driver.find_element(By.ID, "question")
    question.send_keys("What is a list?")
    question.send_keys(Keys.ENTER)
    answer = WebDriverWait(driver, 60).until(
        lambda d: d.find_elements(By.ID, "answer-1") and
        d.find_element(By.ID, "answer-1").get_attribute("data-done") == "true" and
        d.find_element(By.ID, "answer-1"))
    assert "error" not in answer.get_attribute("class")
    assert answer.get_property("textContent") == expected
    assert int(answer.get_attribute("data-chunks")) > 3  # it arrived in pieces, as generated
  finally:
    driver.quit()


def test_sigterm_finishes_the_running_requests_then_exits(server, keys):
  """Last in the module: SIGTERM with three streams in flight; each gets its whole answer (the
  one it gets alone)."""
  client = server.client(keys[1]["dev"])
  prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[5]]
  expected = [client.completions.create(model="base", prompt=p, max_tokens=CAP_TOKENS,
                                        temperature=0).choices[0].text for p in prompts]
  started = threading.Barrier(4)
  results = [None] * 3

  def stream(i):
    chunks = client.completions.create(model="base", prompt=prompts[i], max_tokens=CAP_TOKENS,
                                       temperature=0, stream=True)
    text, finish = "", None
    for n, chunk in enumerate(chunks):
      if n == 0:
        started.wait()
      text += chunk.choices[0].text
      finish = chunk.choices[0].finish_reason or finish
    results[i] = (text, finish)

  threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
  for t in threads:
    t.start()
  started.wait()
  server.process.send_signal(signal.SIGTERM)
  for t in threads:
    t.join(timeout=60)
  assert server.process.wait(timeout=60) == 0
  out = "".join(server.lines)
  assert "signal SIGTERM: draining" in out and "drained: every request finished" in out, out
  assert [r and r[0] for r in results] == expected
  with pytest.raises(urllib.error.URLError):
    urllib.request.urlopen(server.url + "/health", timeout=5)
