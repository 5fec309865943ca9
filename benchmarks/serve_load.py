"""Load test of `uptrain serve`: requests/s, generated tokens/s, time to first token and latency percentiles
at several concurrencies, for a model and a baseline served the same way (real HTTP on the loopback).

For each model and concurrency C: start `uptrain serve MODEL --port 0 --max-batch B` in a subprocess (B = C
unless --max-batch is given: the static engine computes all B rows every round, so B is sized to the load),
one warm-up request, then C client threads send streaming completions (`ignore_eos`, greedy, exactly
--max-tokens new tokens each) until max(--min-requests, --waves x C) have been sent or --time-limit has
passed, and the ones sent finish; then SIGTERM. Prompts are distinct slices of words from a local text file.
Bounded in count and time, and only ever talks to 127.0.0.1.

    python benchmarks/serve_load.py BLOCK_FOLDER --baseline SOURCE [--concurrency 1,4,16,64] [--waves 2] \\
        [--max-tokens 32] [--prompt-words 48] [--threads 1] [--time-limit 240] --output RESULTS.json

Writes the JSON after each concurrency (a run cut short keeps what it measured) and prints a Markdown table.
"""

import argparse
import datetime
import http.client
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Served:
    """`uptrain serve MODEL` in a subprocess on 127.0.0.1 and a free port."""

    def __init__(self, model: str, max_batch: int, max_context: int, extra: list[str], threads: int | None):
        command = [
            sys.executable,
            "-m",
            "uptrain",
            "serve",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--max-batch",
            str(max_batch),
            "--max-queue",
            str(4 * max_batch),
            "--max-context",
            str(max_context),
            *extra,
        ]
        self.command = command
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        line = self.process.stdout.readline()
        if "http://" not in line:
            self.process.kill()
            raise SystemExit(f"the server for {model} did not start: {line}")
        self.banner = line.strip()
        self.port = int(line.split("http://")[1].split()[0].rsplit(":", 1)[1])

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)


def stream_completion(port: int, model: str, prompt: str, max_tokens: int) -> dict:
    """One streaming completion -> its timings (seconds from the request) and token count."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first, tokens = None, 0
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if first is None and event["choices"] and event["choices"][0]["text"]:
            first = time.perf_counter() - start
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    connection.close()
    return {"ttft": first, "latency": time.perf_counter() - start, "tokens": tokens}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))]


def load(
    port: int, model: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int, time_limit: float
) -> dict:
    """C threads send completions until `requests` are sent or `time_limit` has passed."""
    results, errors, lock = [], [], threading.Lock()
    sent = iter(range(requests))
    deadline = time.perf_counter() + time_limit

    def client():
        while time.perf_counter() < deadline:
            with lock:
                index = next(sent, None)
            if index is None:
                return
            try:
                outcome = stream_completion(port, model, prompts[index % len(prompts)], max_tokens)
            except Exception as error:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(str(error))
                continue
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    latency = [r["latency"] for r in results]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": errors,
        "seconds": wall,
        "requests_per_second": len(results) / wall,
        "tokens_per_second": tokens / wall,
        "generated_tokens": tokens,
        "ttft_p50": percentile(ttft, 0.5) if ttft else None,
        "ttft_p99": percentile(ttft, 0.99) if ttft else None,
        "latency_p50": percentile(latency, 0.5) if latency else None,
        "latency_p99": percentile(latency, 0.99) if latency else None,
    }


def prompts_from(path: Path, count: int, words: int) -> list[str]:
    text = path.read_text().split()
    return [" ".join(text[i * words : (i + 1) * words]) for i in range(min(count, len(text) // words))]


def environment() -> dict:
    import torch
    import transformers

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "load_average_at_start": os.getloadavg(),
        "command": " ".join(sys.argv),
    }


def table(report: dict) -> str:
    lines = [
        "| model | concurrency | requests | req/s | gen tok/s | TTFT p50 (s) | TTFT p99 (s) | latency p50 (s) |"
        " latency p99 (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, runs in report["results"].items():
        for run in runs:
            lines.append(
                f"| {label} | {run['concurrency']} | {run['requests']} | {run['requests_per_second']:.2f} | "
                f"{run['tokens_per_second']:.1f} | {run['ttft_p50']:.2f} | {run['ttft_p99']:.2f} | "
                f"{run['latency_p50']:.2f} | {run['latency_p99']:.2f} |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--baseline")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--waves", type=int, default=2, help="requests a client sends, at each concurrency")
    parser.add_argument("--min-requests", type=int, default=8, help="requests at each concurrency, at least")
    parser.add_argument("--max-batch", type=int, help="the server's rows (default: the concurrency)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=48)
    parser.add_argument("--time-limit", type=float, default=240.0, help="seconds a concurrency sends requests")
    parser.add_argument("--max-context", type=int, default=256)
    parser.add_argument("--threads", type=int, help="the server's OMP_NUM_THREADS (default: torch's choice)")
    parser.add_argument("--text", type=Path, default=ROOT / "README.md", help="where the prompts' words come from")
    parser.add_argument("--serve-args", default="--device cpu --dtype float32")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    counts = {c: max(args.min_requests, args.waves * c) for c in levels}
    prompts = prompts_from(args.text, max(counts.values()) + 1, args.prompt_words)
    report = {"environment": environment(), "settings": {k: str(v) for k, v in vars(args).items()}, "results": {}}
    for label, spec in (("block", args.model), ("vanilla", args.baseline)):
        if spec is None:
            continue
        for concurrency in levels:
            rows = args.max_batch or concurrency
            served = Served(spec, rows, args.max_context, args.serve_args.split(), args.threads)
            try:
                stream_completion(served.port, spec, prompts[-1], args.max_tokens)  # warm-up
                run = load(
                    served.port, spec, prompts, concurrency, counts[concurrency], args.max_tokens, args.time_limit
                )
            finally:
                served.stop()
            run.update(max_batch=rows, server=" ".join(served.command), banner=served.banner)
            report["results"].setdefault(label, []).append(run)
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(report, indent=2) + "\n")
            print(
                f"{label} C={concurrency}: {run['requests']} requests, {run['tokens_per_second']:.1f} tok/s, "
                f"TTFT p50 {run['ttft_p50']:.2f} s",
                flush=True,
            )
    report["environment"]["load_average_at_end"] = os.getloadavg()
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


if __name__ == "__main__":
    main()
