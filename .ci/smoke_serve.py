"""The README's main job as a new user runs it: `rayinfer serve`, one chat completion, Ctrl-C.

Run with the `rayinfer` command of a fresh environment installed without extras (see .ci/run):
it starts the server on a free loopback port, waits for its "serving" line, sends one chat completion with
the standard library's HTTP client, sends SIGINT and expects a clean exit. Standard library only.
"""
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

START_TIMEOUT_S = 600  # a cold first start on a 2-core machine imports torch and Ray and starts 5 actors
STOP_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except (urllib.error.URLError, OSError):
        return 0


def main(rayinfer: str) -> int:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    proc = subprocess.Popen([rayinfer, "serve", "--port", str(port)], stdout=subprocess.PIPE, text=True)
    ready_line = threading.Event()

    def watch() -> None:  # what the user waits for: the server says it serves (Ray is done deploying)
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.startswith("rayinfer: serving"):
                ready_line.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        while not ready_line.is_set() or _get(base + "/health") != 200:
            if proc.poll() is not None:
                print(f"smoke: rayinfer serve exited with {proc.returncode} before serving", file=sys.stderr)
                return 1
            if time.time() - t0 > START_TIMEOUT_S:
                print(f"smoke: not serving after {START_TIMEOUT_S}s", file=sys.stderr)
                return 1
            time.sleep(1)
        ready = time.time() - t0
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hello"}],
                           "max_tokens": 8, "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
        assert out["object"] == "chat.completion" and out["usage"]["completion_tokens"] >= 1, out
        print(f"smoke: served after {ready:.0f}s; chat completion: {out['choices'][0]['message']['content']!r}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            print(f"smoke: rayinfer serve did not exit within {STOP_TIMEOUT_S}s of SIGINT", file=sys.stderr)
            return 1
    if rc != 0:
        print(f"smoke: rayinfer serve exited with {rc} after SIGINT", file=sys.stderr)
        return 1
    print(f"smoke: clean exit after SIGINT ({time.time() - t0:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
