"""API keys stored as hashes, and a rate limit per key.

The keys file (--api-keys FILE) has one key a line: its SHA-256 in hex, a name, and optionally a
limit in requests per minute; '#' starts a comment:

  # sha256                                                          name   requests/min
  9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  alice  rpm=60
  60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752  ci

Make a key (printed once; only its hash is written):

  python -m foundation.serve.keys add --file keys.txt --name alice --rpm 60

The keys are 32 random bytes (urlsafe base64, prefixed 'sk-'), so a plain SHA-256 is enough: no
dictionary attack applies to them and the check is one hash per request. The comparison against
the stored hashes is constant-time.

Rate limit: a token bucket per key, `rpm` requests per minute with bursts of up to `rpm`; an empty
bucket answers 429 with Retry-After, the whole seconds until a request is allowed again.
"""

import argparse
import hashlib
import hmac
import math
import os
import secrets
import sys
import threading
import time


class KeyFileError(ValueError):
  pass


def hash_key(key: str) -> str:
  return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Key:
  def __init__(self, digest: str, name: str, rpm: float):
    self.digest, self.name, self.rpm = digest, name, rpm
    self._tokens, self._last = rpm, time.monotonic()
    self._lock = threading.Lock()

  def take(self) -> float:
    """0 when a request is allowed now (and counted); else the seconds until one is."""
    if self.rpm <= 0:
      return 0.0
    with self._lock:
      now = time.monotonic()
      self._tokens = min(self.rpm, self._tokens + (now - self._last) * self.rpm / 60)
      self._last = now
      if self._tokens >= 1:
        self._tokens -= 1
        return 0.0
      return (1 - self._tokens) * 60 / self.rpm


class Keys:
  """The keys of a keys file; `find(key)` -> Key or None."""

  def __init__(self, keys: list[Key]):
    self.keys = keys

  @classmethod
  def read(cls, path: str, default_rpm: float = 0) -> "Keys":
    try:
      with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    except OSError as e:
      raise KeyFileError(f"--api-keys {path}: {e.strerror}") from None
    keys = []
    for number, line in enumerate(lines, 1):
      line = line.split("#")[0].strip()
      if not line:
        continue
      fields = line.split()
      digest = fields[0].lower()
      if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise KeyFileError(f"--api-keys {path}:{number}: the first field must be a key's SHA-256 "
                           f"in hex (64 characters), got {fields[0][:70]!r}; make keys with "
                           f"python -m foundation.serve.keys add")
      name, rpm = (fields[1] if len(fields) > 1 else f"key{number}"), default_rpm
      for extra in fields[2:]:
        option, _, value = extra.partition("=")
        try:
          if option != "rpm":
            raise ValueError
          rpm = float(value)
        except ValueError:
          raise KeyFileError(f"--api-keys {path}:{number}: unknown field {extra!r}; the only "
                             f"option is rpm=N (requests per minute)") from None
      keys.append(Key(digest, name, rpm))
    if not keys:
      raise KeyFileError(f"--api-keys {path}: no keys in the file")
    return cls(keys)

  def find(self, key: str) -> Key | None:
    digest = hash_key(key)
    found = None
    for k in self.keys:  # every stored hash compared, in constant time each
      if hmac.compare_digest(k.digest, digest):
        found = k
    return found


def retry_after_seconds(wait: float) -> int:
  return max(1, math.ceil(wait))


def new_key() -> str:
  return "sk-" + secrets.token_urlsafe(32)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m foundation.serve.keys",
                                   description="Add an API key to a keys file (only its hash).")
  sub = parser.add_subparsers(dest="command", required=True)
  add = sub.add_parser("add", help="make a key, print it once, append its hash to FILE")
  add.add_argument("--file", required=True)
  add.add_argument("--name", required=True)
  add.add_argument("--rpm", type=float, default=0, help="requests per minute (0: no limit)")
  args = parser.parse_args(argv)
  if not args.name or any(c.isspace() for c in args.name):
    parser.error(f"--name {args.name!r}: one word, no spaces")
  key = new_key()
  line = f"{hash_key(key)}  {args.name}" + (f"  rpm={args.rpm:g}" if args.rpm else "")
  fresh = not os.path.exists(args.file)
  fd = os.open(args.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
  with os.fdopen(fd, "a", encoding="utf-8") as f:
    if fresh:
      f.write("# sha256 of the key, name, optional rpm=N (foundation/serve/keys.py)\n")
    f.write(line + "\n")
  print(key)
  print(f"added {args.name!r} to {args.file} (only its SHA-256 is stored: keep the key now)",
        file=sys.stderr)


if __name__ == "__main__":
  main()
