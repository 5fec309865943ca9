"""`uptrain bench`: generation throughput of a model against a baseline (docs/guides/bench.md).

Every measurement: random prompts of `prompt_len` tokens, exactly `gen_len` new tokens a row (EOS is
suppressed by min_new_tokens), greedy; `warmup` untimed runs, then `repeats` timed runs, median reported.
The fast engine builds its buffers and captures its CUDA graphs in the first run of a batch size, so that
run is a warm-up's job (the default `warmup` of 1 does it).

Engines (`--engine`, and `--baseline-engine`, by default the same):
- fast: static caches, one CUDA graph a step (on CPU the same step functions, uncaptured). A block model's
  `generate(engine="fast")`; for a vanilla model `uptrain.vanilla_engine`, the same engine skeleton and
  kernels, so that the ratio measures the architecture. `--compile` puts each step function through
  `torch.compile` before its capture (compiling takes a minute or more per model and batch size, in the
  warm-up run).
- eager: no static caches, no graphs: a block model's eager engine; transformers' `generate` for a vanilla one.
- hf: `model.generate()` as a user calls it: transformers' for a vanilla model, a block model's default
  engine (fast on CUDA, eager on CPU).
On CUDA the runs are timed with CUDA events and memory is torch's peak allocation; on CPU with
perf_counter and the process's peak resident memory (reset before each run through /proc, on Linux).
Throughput does not depend on weight values, so `random_init` builds models from their configs alone.
"""

import functools
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .architectures import is_block_model
from .errors import UserError
from .inference import load_for_inference
from .models import random_model
from .sources import DTYPES

SCENARIOS = {"prefill-heavy": (2048, 128), "decode-heavy": (128, 2048)}  # (prompt_len, gen_len), the paper's
ENGINES = ("fast", "eager", "hf")


@dataclass
class BenchSettings:
    scenario: str = "decode-heavy"
    prompt_len: int | None = None
    gen_len: int | None = None
    batch_sizes: list[int] | None = None  # None: search upwards until memory runs short ("auto")
    warmup: int = 1
    repeats: int = 3
    device: str = "cpu"
    dtype: str = "bfloat16"
    random_init: bool = False
    max_batch_size: int = 65536
    memory_fraction: float = 0.9  # auto stops before a batch is predicted to need more than this
    seed: int = 0
    engine: str = "fast"
    baseline_engine: str | None = None  # None: the same as `engine`
    compile: bool = False  # the fast engine's steps through torch.compile

    def __post_init__(self):
        if self.scenario in SCENARIOS:
            default_prompt, default_gen = SCENARIOS[self.scenario]
            self.prompt_len = self.prompt_len or default_prompt
            self.gen_len = self.gen_len or default_gen
        elif self.scenario == "custom":
            if not (self.prompt_len and self.gen_len):
                raise UserError("--scenario custom needs --prompt-len and --gen-len")
        else:
            raise UserError(f"unknown scenario {self.scenario!r}: choose prefill-heavy, decode-heavy or custom")
        if self.prompt_len < 1 or self.gen_len < 1 or self.repeats < 1 or self.warmup < 0:
            raise UserError("--prompt-len, --gen-len and --repeats must be at least 1, --warmup at least 0")
        if self.dtype not in DTYPES:
            raise UserError(f"unknown dtype {self.dtype!r}: choose {', '.join(DTYPES)}")
        if any(size < 1 for size in self.batch_sizes or []):
            raise UserError("batch sizes must be at least 1")
        self.baseline_engine = self.baseline_engine or self.engine
        for engine in (self.engine, self.baseline_engine):
            if engine not in ENGINES:
                raise UserError(f"unknown engine {engine!r}: choose {', '.join(ENGINES)}")
        if self.compile and "fast" not in (self.engine, self.baseline_engine):
            raise UserError(
                "--compile compiles the fast engine's steps: use it with --engine fast or --baseline-engine fast"
            )


@dataclass
class Measurement:
    batch_size: int
    seconds: float  # median over the repeats, prefill included
    tokens_per_second: float  # generated tokens (batch_size * gen_len) / seconds
    ms_per_token: float  # seconds / gen_len: the time between two tokens of one row
    peak_memory_bytes: int | None
    all_seconds: list[float] = field(default_factory=list)
    warmup_seconds: list[float] = field(default_factory=list)  # wall time of each warm-up: capture, compile


def parse_batch_sizes(text: str) -> list[int] | None:
    """'auto' -> None; '1,8,64' -> [1, 8, 64]."""
    if text.strip() == "auto":
        return None
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--batch-size takes a number, a comma-separated list or 'auto', not {text!r}") from None
    if not sizes:
        raise UserError("--batch-size is empty")
    return sizes


def build_model(spec: str, settings: BenchSettings):
    """The model on its device in eval mode: loaded, or (random_init) built from its config alone."""
    if not settings.random_init:
        return load_for_inference(spec, settings.device, settings.dtype)[0]
    return random_model(spec, settings.device, settings.dtype)


def generate_function(model, engine: str, compile_steps: bool = False) -> Callable:
    """`generate(prompts, **arguments)` of `model` with `engine` (see the module docstring); `compile_steps`
    applies to the fast engine."""
    if is_block_model(model):
        if engine == "hf":
            return model.generate
        return functools.partial(model.generate, engine=engine, compile_steps=compile_steps and engine == "fast")
    if engine == "fast":
        from .vanilla_engine import generate_static

        return functools.partial(generate_static, model, compile_steps=compile_steps)
    return model.generate


def measure(model, settings: BenchSettings, batch_size: int, engine: str | None = None) -> Measurement:
    """Warm-up, then timed repeats of one generation at `batch_size`; raises torch.OutOfMemoryError."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(settings.seed)
    prompts = torch.randint(0, vocab, (batch_size, settings.prompt_len), generator=generator).to(device)
    arguments = {
        "attention_mask": torch.ones_like(prompts),
        "max_new_tokens": settings.gen_len,
        "min_new_tokens": settings.gen_len,
        "do_sample": False,
        "pad_token_id": 0,
    }

    generate = generate_function(model, engine or settings.engine, settings.compile)

    def run():
        output = generate(prompts, **arguments)
        assert output.shape == (batch_size, settings.prompt_len + settings.gen_len), output.shape

    warmups = []
    for _ in range(settings.warmup):
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        warmups.append(time.perf_counter() - started)
    timer = _CudaTimer(device) if device.type == "cuda" else _CpuTimer()
    times = [timer.time(run) for _ in range(settings.repeats)]
    seconds = statistics.median(times)
    return Measurement(
        batch_size=batch_size,
        seconds=seconds,
        tokens_per_second=batch_size * settings.gen_len / seconds,
        ms_per_token=1000 * seconds / settings.gen_len,
        peak_memory_bytes=timer.peak_memory,
        all_seconds=times,
        warmup_seconds=warmups,
    )


def sweep(
    model,
    settings: BenchSettings,
    label: str,
    results: list[dict],
    on_result: Callable = lambda: None,
    engine: str | None = None,
    deadline: float | None = None,
) -> None:
    """Measure every requested batch size, or (auto) 1, 4, 16, ... until the next would not fit, then the
    largest power of two between; append each result to `results` as it comes. An out-of-memory error ends
    the search and is recorded, not raised. `deadline` (a `time.perf_counter()` value): a batch size whose
    runs are predicted to end later is recorded as skipped and ends the search."""

    def record(size: int) -> dict:
        late = _past_deadline(results, size, settings, deadline)
        results.append(
            {"batch_size": size, "skipped": late} if late else _measure_or_oom(model, settings, size, engine)
        )
        bar.update()
        bar.set_postfix(batch=size, tok_s=f"{results[-1].get('tokens_per_second', 0):,.0f}")
        on_result()
        return results[-1]

    def ends(result: dict) -> bool:
        return bool(result.get("out_of_memory") or result.get("skipped"))

    if settings.batch_sizes is not None:
        bar = tqdm(total=len(settings.batch_sizes), desc=f"bench {label}", unit="batch size")
        for size in settings.batch_sizes:
            if ends(record(size)):
                break
        bar.close()
        return
    device = next(model.parameters()).device
    budget = settings.memory_fraction * _memory_capacity(device)
    size, factor = 1, 4
    bar = tqdm(desc=f"bench {label} (auto batch)", unit="batch size")
    while size <= settings.max_batch_size:
        if ends(record(size)):
            break
        grow = next_batch_size(
            results[-1].get("peak_memory_bytes"), size, factor, budget, _resident(device), settings.max_batch_size
        )
        if grow is None:
            break
        if grow < size * factor:  # the last step: the largest power of two that fits, then stop
            record(grow)
            break
        size = grow
    bar.close()


def next_batch_size(
    peak: int | None, size: int, factor: int, budget: float, resident: int, max_size: int
) -> int | None:
    """The auto search's next batch size after `size`, whose run peaked at `peak` bytes (None: unknown): size *
    factor if it is predicted to fit `budget`, else the largest power of two above `size` that is; None when
    none is. Memory beyond the `resident` weights grows linearly with the batch."""
    limit = max_size
    if peak is not None and math.isfinite(budget):
        per_row = max(peak - resident, 1) / size
        limit = min(limit, int((budget - resident) // per_row))
    candidate = size * factor
    while candidate > size and candidate > limit:
        candidate //= 2
    return candidate if candidate > size else None


def predicted_seconds(measured: list[dict], size: int) -> float:
    """Seconds of one run at batch `size`, extrapolated from the last two measured sizes: time grows as
    batch^a, with a from those two, kept between 0.5 and 1 (a run never gets cheaper with a larger batch,
    and grows at most linearly once the device is full); linear when only one size was measured."""
    points = [r for r in measured if "seconds" in r][-2:]
    last = points[-1]
    exponent = 1.0
    if len(points) == 2 and points[0]["batch_size"] != last["batch_size"]:
        ratio = math.log(last["seconds"] / points[0]["seconds"]) / math.log(
            last["batch_size"] / points[0]["batch_size"]
        )
        exponent = min(1.0, max(0.5, ratio))
    return last["seconds"] * (size / last["batch_size"]) ** exponent


SETUP_MARGIN_S = 30  # at least this much time for a new batch size's buffers, capture and compile


def _past_deadline(results: list[dict], size: int, settings: BenchSettings, deadline: float | None) -> str | None:
    """Why `size` is skipped (its warm-up and repeats predicted to end after `deadline`), or None."""
    if deadline is None or not any("seconds" in r for r in results):
        return None
    last = [r for r in results if "seconds" in r][-1]
    setup = max(last.get("warmup_seconds") or [0]) - last["seconds"]  # a warm-up's excess: capture, compile
    predicted = predicted_seconds(results, size) * (settings.warmup + settings.repeats) + max(SETUP_MARGIN_S, setup)
    if time.perf_counter() + predicted <= deadline:
        return None
    return f"predicted {predicted:.0f} s"


def _measure_or_oom(model, settings: BenchSettings, size: int, engine: str | None = None) -> dict:
    try:
        return asdict(measure(model, settings, size, engine))
    except torch.OutOfMemoryError:
        return {"batch_size": size, "out_of_memory": True}
    finally:  # the next size's prediction counts what stays allocated as the weights
        release_engines(model)


def release_engines(model) -> None:
    """Drop the fast engine's buffers and graphs kept for `model` (before the next batch size or model)."""
    if hasattr(model, "release_generation_engine"):  # a block model, whose engine lives in its own module
        model.release_generation_engine()
    else:
        from .generation_block_transformer import release_engine

        release_engine(model)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _memory_capacity(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 + _resident(device)
    except OSError:
        pass
    return math.inf


def _resident(device: torch.device) -> int:
    """Memory held before a run: the weights (CUDA allocations), or the process's resident set (CPU)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_bytes("VmRSS") or 0


def _proc_status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _CudaTimer:
    def __init__(self, device):
        self.device = device
        self.peak_memory = 0

    def time(self, run: Callable) -> float:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize(self.device)
        self.peak_memory = max(self.peak_memory, torch.cuda.max_memory_allocated(self.device))
        return start.elapsed_time(end) / 1000


class _CpuTimer:
    def __init__(self):
        self.peak_memory = None

    def time(self, run: Callable) -> float:
        _reset_peak_rss()
        started = time.perf_counter()
        run()
        seconds = time.perf_counter() - started
        peak = _proc_status_bytes("VmHWM")
        if peak is not None:
            self.peak_memory = max(self.peak_memory or 0, peak)
        return seconds


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS
    except OSError:
        pass


def environment(device: str) -> dict:
    import transformers

    facts = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device}
    if device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return facts


def speedups(model_results: list[dict], baseline_results: list[dict]) -> dict:
    """Throughput ratios: at each batch size both ran, and best against best (each at its own batch size)."""

    def ok(results):
        return {r["batch_size"]: r["tokens_per_second"] for r in results if "tokens_per_second" in r}

    ours, theirs = ok(model_results), ok(baseline_results)
    if not ours or not theirs:
        return {}
    return {
        "at_same_batch_size": {size: ours[size] / theirs[size] for size in sorted(ours.keys() & theirs.keys())},
        "best_vs_best": max(ours.values()) / max(theirs.values()),
        "model_best_batch_size": max(ours, key=ours.get),
        "baseline_best_batch_size": max(theirs, key=theirs.get),
    }


def engine_label(part: dict) -> str:
    """A report part's engine as the table and the plot name it."""
    return f"{part['engine']} engine" + (", compiled steps" if part.get("compile_steps") else "")


def format_table(report: dict) -> str:
    lines = []
    for key in ("model", "baseline"):
        if key not in report:
            continue
        part = report[key]
        engine = f" ({engine_label(part)})" if part.get("engine") else ""
        lines += [
            f"{key}: {part['name']}{engine}",
            "| batch | tokens/s | ms/token | peak memory GiB |",
            "|---|---|---|---|",
        ]
        for r in part["results"]:
            if "tokens_per_second" not in r:
                lines.append(
                    f"| {r['batch_size']} | {'out of memory' if r.get('out_of_memory') else r.get('skipped')} | | |"
                )
                continue
            memory = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r.get("peak_memory_bytes") else "n/a"
            lines.append(f"| {r['batch_size']} | {r['tokens_per_second']:,.1f} | {r['ms_per_token']:.2f} | {memory} |")
        lines.append("")
    ratio = report.get("speedup", {})
    if ratio:
        same = ", ".join(f"batch {size}: {value:.2f}x" for size, value in ratio["at_same_batch_size"].items())
        lines.append(f"speed-up at equal batch size: {same or 'no common batch size'}")
        lines.append(
            f"speed-up, best throughput vs best throughput: {ratio['best_vs_best']:.2f}x "
            f"(batch {ratio['model_best_batch_size']} vs {ratio['baseline_best_batch_size']})"
        )
    return "\n".join(lines)


def draw(report: dict, path: Path) -> Path | None:
    """Throughput against batch size, both models, log-log; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for key, marker in (("model", "o"), ("baseline", "s")):
        if key not in report:
            continue
        points = [r for r in report[key]["results"] if "tokens_per_second" in r]
        engine = f" ({engine_label(report[key])})" if report[key].get("engine") else ""
        axes.plot(
            [r["batch_size"] for r in points],
            [r["tokens_per_second"] for r in points],
            marker=marker,
            label=f"{key}: {_short(report[key]['name'])}{engine}",
        )
    settings = report["settings"]
    axes.set(
        xscale="log",
        yscale="log",
        xlabel="batch size",
        ylabel="generated tokens / s",
        title=f"{settings['scenario']}: {settings['prompt_len']} -> {settings['gen_len']} tokens "
        f"({report['environment'].get('gpu', report['environment']['device'])})",
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def bench(
    model_spec: str, baseline_spec: str | None, settings: BenchSettings, on_result: Callable = lambda _: None
) -> dict:
    """Measure the model (and the baseline, one after the other on the same device); returns the report.
    `on_result(report)` is called after every measurement, so that a long run can save what it has."""
    report = {"settings": asdict(settings), "environment": environment(settings.device)}
    engines = {"model": settings.engine, "baseline": settings.baseline_engine}
    for key, spec in (("model", model_spec), ("baseline", baseline_spec)):
        if spec is None:
            continue
        model = build_model(spec, settings)
        report[key] = {
            "name": spec,
            "engine": engines[key],
            "compile_steps": settings.compile and engines[key] == "fast",
            "parameters": sum(p.numel() for p in model.parameters()),
            "results": [],
        }
        sweep(model, settings, key, report[key]["results"], lambda: on_result(report), engines[key])
        release_engines(model)
        del model
        if settings.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if "baseline" in report:
        report["speedup"] = speedups(report["model"]["results"], report["baseline"]["results"])
    return report


def write_report(report: dict, output: Path, plot: bool = True) -> Path | None:
    """JSON at `output` and the plot beside it (same name, .png); returns the plot's path if written."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    return draw(report, output.with_suffix(".png")) if plot else None
