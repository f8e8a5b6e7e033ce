"""The benchmarks' side of vLLM: launching benchmarks/_vllm.py with another Python, and reading what it returns.

Owns the subprocesses (offline generation, `vllm serve`, `vllm bench serve`) and their lifetimes: a
server is stopped by its own pid. What crosses: prompt token ids and options out (JSON file, argv),
timings, token ids and `vllm bench serve`'s saved result JSON back. vLLM's arguments for CPU live here.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_vllm.py")


def check_python(python: str) -> str:
    """The --vllm-python value, checked to name a runnable file."""
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise SystemExit(f"--vllm-python {python!r} is not an executable file (a Python with vLLM installed)")
    return python


def command(python: str, *vllm_args: str) -> list[str]:
    """vLLM's own CLI (`serve ...`, `bench serve ...`) run by `python` through the runner."""
    return [python, RUNNER, "cli", *vllm_args]


def offline(python: str, checkpoint: str, prompt_ids: list[list[int]], max_tokens: int, dtype: str,
            log: str | None = None) -> dict:
    """vLLM's LLM.generate on the same prompt ids, greedy, ignore_eos: {"seconds", "token_ids", "vllm_version"}."""
    with tempfile.TemporaryDirectory(prefix="rayinfer-vllm-") as tmp:
        req, res = os.path.join(tmp, "request.json"), os.path.join(tmp, "result.json")
        with open(req, "w") as f:
            json.dump({"model": checkpoint, "prompt_token_ids": prompt_ids, "max_tokens": max_tokens,
                       "dtype": dtype}, f)
        _run([python, RUNNER, "offline", req, res], log)
        with open(res) as f:
            return json.load(f)


def _run(argv: list[str], log: str | None) -> None:
    out = open(log, "wb") if log else subprocess.DEVNULL
    try:
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode
    finally:
        if log:
            out.close()
    if rc != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited with {rc}" + (f"; see {log}" if log else ""))


class Server:
    """`vllm serve CHECKPOINT` on 127.0.0.1:port, in its own process group; `stop()` ends that group by pid."""

    def __init__(self, python: str, checkpoint: str, port: int, dtype: str, name: str, log: str):
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            command(python, "serve", checkpoint, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
                    "--served-model-name", name, "--max-model-len", "4096", "--seed", "0",
                    "--disable-uvicorn-access-log"),
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 1200.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; see {self._log.name}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        raise TimeoutError(f"vllm serve not healthy after {timeout_s:.0f} s; see {self._log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its session: the API server and its engine core
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def bench_serve(python: str, url: str, name: str, tokenizer: str, args, log: str) -> dict:
    """`vllm bench serve` (random dataset) against `url`; its --save-result JSON, parsed."""
    with tempfile.TemporaryDirectory(prefix="rayinfer-bench-") as tmp:
        _run(command(python, "bench", "serve", "--backend", "vllm", "--base-url", url, "--model", name,
                     "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(args.prompt_len),
                     "--random-output-len", str(args.output_len), "--num-prompts", str(args.requests),
                     "--max-concurrency", str(args.concurrency), "--ignore-eos", "--seed", "0",
                     "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
                     "--save-result", "--result-dir", tmp, "--result-filename", "result.json"), log)
        with open(os.path.join(tmp, "result.json")) as f:
            return json.load(f)


if __name__ == "__main__":
    sys.exit("a helper module of benchmarks/serve.py and benchmarks/throughput.py, not a script")
