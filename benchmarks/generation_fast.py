"""Fast generation on a GPU: token checks, then four engines' throughput -> JSON, PNG, kernel table.

On a GPU machine where block-uptrain is installed, one command per part (results land in --out; --budget-s
skips measurements predicted to end later than that many seconds after the start). The measured figures and
the exact commands behind them are in docs/results/generation-gpu.md and docs/results/token-agreement.md:

    python benchmarks/generation_fast.py --out parts --parts check
    python benchmarks/generation_fast.py --out parts --parts decode-heavy --budget-s 530
    python benchmarks/generation_fast.py --out parts --parts profile,prefill-heavy --profile-batch 4096
    python benchmarks/generation_fast.py --out parts --shape SmolLM2-360M --parts decode-heavy,prefill-heavy

Part files are named SHAPE-PART.json (and SHAPE-profile-batchN.txt). With the part files of several runs in
one folder, render them together (results.json with roofline estimates, one PNG per shape and scenario, summary):

    python benchmarks/generation_fast.py --render FOLDER

and on a CPU in seconds, tiny sizes, everything in one go: `python benchmarks/generation_fast.py --smoke --out DIR`.

Models: the SmolLM2-135M shape (Llama, 30 layers, D 576, 9 heads, 3 KV heads, vocab 49,152, tied head) or
SmolLM2-360M's (--shape; 32 layers, D 960, 15 heads, 5 KV heads) and its plain conversion (half the layers
each, L_B 4, r 2, no token input layers, no sink: `PLAIN`, what docs/results/generation-gpu.md measures), with
random weights unless --gguf names SmolLM2's GGUF (real weights; converted here in float32). Every JSON records
which.

- check: greedy tokens of the block model's fast engine (CUDA graphs) against its eager engine, float32 and
  bf16, over --check-new-tokens (2,048) from left-padded prompts of four lengths around 128; the vanilla fast
  engine against transformers' greedy generate in float32 over 256 tokens. Float32 must be identical; bf16
  must agree on >= 99% of the tokens (a row that diverges once usually differs from there on, so the first
  divergence of each row is recorded too). Random weights give almost flat logits, where bf16 near-ties are
  common. Real weights do not rescue the 99%: any two engines whose kernels sum in different orders flip
  near-ties (docs/results/token-agreement.md). benchmarks/bf16_agreement.py checks the sounder criterion on real weights
  (every bf16 divergence starts at a float32 near-tie).
- decode-heavy (128 -> 2,048) and prefill-heavy (2,048 -> 128): `uptrain.bench.sweep` (random prompts,
  exactly the new tokens a row, greedy; CUDA-event timing, median of the repeats, torch's peak memory) for
  block fast, block eager, vanilla fast and vanilla hf (transformers' generate), and "compiled" (the fast
  engine with `--compile`'s compiled steps) where a part names it, each over its batch sizes until memory
  runs short or a measurement would end past --budget-s (a run's time extrapolated from the last two batch
  sizes). The fast engines warm up once (that run builds the buffers and captures the graphs), then 2 timed
  runs; the eager ones, host-bound and slow, run once with no warm-up (they follow the fast engines in the same
  process), unless --eager-warmup gives them a warm-up run too: their first run at a large batch can take
  twice a warmed one (docs/results/generation-gpu.md).
- profile: torch.profiler over one block fast run (decode-heavy shape, --profile-new-tokens new tokens) at
  --profile-batch: the kernel table sorted by device time (--profile-engine compiled: the compiled steps).
"""

import argparse
import json
import time
from pathlib import Path

import torch

from uptrain.bench import BenchSettings, environment, release_engines, sweep

SMOLLM2 = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "rope_theta": 100000.0,
}
SHAPES = {  # --shape: name -> Llama config fields (SmolLM2-360M: 32 layers, width 960, 15 heads, 5 KV heads)
    "SmolLM2-135M": SMOLLM2,
    "SmolLM2-360M": {
        **SMOLLM2,
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
    },
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
# Peak dense bf16 FLOP/s and memory bandwidth (bytes/s) of the cards the roofline knows, from the vendors' sheets.
CARDS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}
ENGINES = [
    ("block", "fast"),
    ("block", "eager"),
    ("vanilla", "fast"),
    ("vanilla", "hf"),
    ("block", "compiled"),
    ("vanilla", "compiled"),
]
DEFAULT_ENGINES = ("fast", "eager", "hf")  # "compiled" (steps through torch.compile) runs when a part names it
# Batch sizes tried per (scenario, model, engine) on an 80 GB H100; a sweep stops at the first out-of-memory.
GPU_BATCHES = {
    ("decode-heavy", "block", "fast"): [256, 1024, 4096, 8192, 16384],
    ("decode-heavy", "block", "eager"): [256, 4096],
    ("decode-heavy", "vanilla", "fast"): [64, 256, 512, 1024],
    ("decode-heavy", "vanilla", "hf"): [256],
    ("prefill-heavy", "block", "fast"): [256, 1024, 4096],
    ("prefill-heavy", "block", "eager"): [256, 1024],
    ("prefill-heavy", "vanilla", "fast"): [64, 256, 512, 1024],
    ("prefill-heavy", "vanilla", "hf"): [256],
}
GPU_BATCHES.update(
    {
        (scenario, kind, "compiled"): sizes
        for (scenario, kind, engine), sizes in list(GPU_BATCHES.items())
        if engine == "fast"
    }
)
SCENARIOS = {"decode-heavy": (128, 2048), "prefill-heavy": (2048, 128)}
SMOKE_SCENARIOS = {"decode-heavy": (8, 64), "prefill-heavy": (64, 8)}
PLAIN = {"token_input_layers": 0, "sink": "none"}  # the paper's conversion, not `uptrain convert`'s default


def parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="Folder for the part files (JSON, PNG, kernel table).")
    parser.add_argument(
        "--parts",
        default="check,decode-heavy,prefill-heavy,profile",
        help="Comma-separated: check, decode-heavy, prefill-heavy (or SCENARIO/block, SCENARIO/vanilla, "
        "SCENARIO/KIND/ENGINE, e.g. decode-heavy/block/compiled), profile.",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="Tiny model on the CPU, tiny sizes: checks the script runs."
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="SmolLM2-135M", help="Model shape (random weights).")
    parser.add_argument("--gguf", type=Path, help="SmolLM2-135M GGUF: real weights (default: random weights).")
    parser.add_argument("--device", default=None, help="Default: cuda if there is one, else cpu.")
    parser.add_argument(
        "--budget-s", type=float, default=540, help="Skip measurements predicted to end later than this."
    )
    parser.add_argument(
        "--eager-warmup",
        action="store_true",
        help="A warm-up run for the eager engines and transformers' generate too (default: none).",
    )
    parser.add_argument(
        "--batches",
        type=lambda text: [int(b) for b in text.split(",")],
        help="Batch sizes for every throughput part named (default: GPU_BATCHES).",
    )
    parser.add_argument("--check-new-tokens", type=int, default=2048)
    parser.add_argument(
        "--profile-batch",
        type=int,
        default=None,
        help="Default: the best block fast batch measured in this run, else 4096.",
    )
    parser.add_argument("--profile-new-tokens", type=int, default=256)
    parser.add_argument(
        "--profile-engine",
        choices=["fast", "compiled"],
        default="fast",
        help="Which block engine the profile part runs (compiled: steps through torch.compile).",
    )
    parser.add_argument(
        "--render", type=Path, help="Merge the part files in this folder into results.json, PNGs and summary.md."
    )
    return parser.parse_args()


class Run:
    def __init__(self, args):
        self.args = args
        self.started = time.perf_counter()
        self.device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        self.shape_name = "tiny" if args.smoke else args.shape
        self.shape = TINY if args.smoke else SHAPES[args.shape]
        self.scenarios = SMOKE_SCENARIOS if args.smoke else SCENARIOS
        self.weights = f"real ({args.gguf.name})" if args.gguf else "random"
        self.out = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.models = {}
        self.facts = {**environment(self.device), "weights": self.weights}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def log(self, text: str):
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    def write(self, name: str, payload: dict):
        """One part file, named after the shape: parts of several shapes can share a folder."""
        record = {"environment": self.facts, "shape": self.shape_name, "config": self.shape, **payload}
        (self.out / f"{self.shape_name}-{name}").write_text(json.dumps(record, indent=2) + "\n")

    # -- models -------------------------------------------------------------------------------------------

    def model(self, kind: str, dtype: torch.dtype):
        """'block' or 'vanilla' in `dtype` on the device; one of each is kept (the last dtype asked for)."""
        key = (kind, dtype)
        if key not in self.models:
            for old in [k for k in self.models if k[0] == kind]:
                del self.models[old]
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            self.models[key] = self._build(kind, dtype)
        return self.models[key]

    def _build(self, kind: str, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM, LlamaConfig

        if self.args.gguf:
            return self._load_real(kind, dtype)
        torch.manual_seed(0)
        source_config = LlamaConfig(**self.shape)
        if kind == "vanilla":
            with torch.device(self.device):
                model = AutoModelForCausalLM.from_config(source_config, dtype=torch.float32)
        else:
            from uptrain.convert import ConvertOptions, build_config
            from uptrain.modeling_block_transformer import BlockTransformerForCausalLM

            config = build_config(source_config, ConvertOptions(**PLAIN), torch.float32)
            with torch.device(self.device):
                model = BlockTransformerForCausalLM(config)
        return model.to(dtype).eval()

    def _load_real(self, kind: str, dtype: torch.dtype):
        import tempfile

        from transformers import AutoModelForCausalLM

        from uptrain.sources import load_model, resolve

        if kind == "vanilla":
            return load_model(resolve(str(self.args.gguf))).to(self.device, dtype).eval()
        if not hasattr(self, "converted"):
            from uptrain.convert import ConvertOptions, convert

            self.converted = Path(tempfile.mkdtemp()) / "b4"
            convert(str(self.args.gguf), self.converted, ConvertOptions(dtype="float32", **PLAIN))
        return (
            AutoModelForCausalLM.from_pretrained(self.converted, trust_remote_code=True, dtype=dtype)
            .to(self.device)
            .eval()
        )

    # -- check --------------------------------------------------------------------------------------------

    def check(self):
        new = 37 if self.args.smoke else self.args.check_new_tokens
        lengths = (9, 6, 5, 3) if self.args.smoke else (128, 125, 98, 77)
        ids, mask = left_padded(lengths, self.shape["vocab_size"], self.device)
        greedy = {"max_new_tokens": new, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
        report = {"new_tokens": new, "prompt_lengths": lengths}
        for dtype in (torch.float32, torch.bfloat16):
            model = self.model("block", dtype)
            timings, outputs = {}, {}
            for engine in ("eager", "fast", "compiled"):
                started = time.perf_counter()
                options = {"engine": "fast", "compile_steps": True} if engine == "compiled" else {"engine": engine}
                outputs[engine] = model.generate(ids, attention_mask=mask, **options, **greedy)[:, ids.shape[1] :]
                synchronize(self.device)
                timings[engine] = time.perf_counter() - started
                model.release_generation_engine()
            name = str(dtype).removeprefix("torch.")
            report[f"block {name}"] = {**compare(outputs["fast"], outputs["eager"]), "seconds": timings}
            report[f"block compiled {name}"] = compare(outputs["compiled"], outputs["eager"])
            self.log(f"block {name}: {report[f'block {name}']}; compiled: {report[f'block compiled {name}']}")
            self.write("check-partial.json", report)  # kept if the part is stopped before its end
        from uptrain.vanilla_engine import generate_static

        vanilla = self.model("vanilla", torch.float32)
        short = dict(greedy, max_new_tokens=min(new, 256))
        expected = vanilla.generate(ids, attention_mask=mask, **short)[:, ids.shape[1] :]
        fast = generate_static(vanilla, ids, attention_mask=mask, **short)[:, ids.shape[1] :]
        release_engines(vanilla)
        report["vanilla float32"] = compare(fast, expected)
        self.log(f"vanilla float32: {report['vanilla float32']}")
        report["passed"] = {
            "block float32 identical": report["block float32"]["identical"],
            "block compiled float32 identical": report["block compiled float32"]["identical"],
            "block bfloat16 >= 99% of tokens": report["block bfloat16"]["token_agreement"] >= 0.99,
            "vanilla float32 identical": report["vanilla float32"]["identical"],
        }
        self.write("check.json", report)
        (self.out / f"{self.shape_name}-check-partial.json").unlink(missing_ok=True)

    # -- throughput ---------------------------------------------------------------------------------------

    def scenario(self, scenario: str, kinds: tuple[str, ...], engines: tuple[str, ...] = DEFAULT_ENGINES):
        prompt_len, gen_len = self.scenarios[scenario]
        dtype = torch.float32 if self.args.smoke else torch.bfloat16
        results = {}
        name = "-".join([scenario, *kinds] + ([] if engines == DEFAULT_ENGINES else list(engines)))  # the part file
        deadline = self.started + self.args.budget_s
        for kind, engine in ENGINES:
            if kind not in kinds or engine not in engines:
                continue
            fast = engine in ("fast", "compiled")
            settings = BenchSettings(
                scenario="custom",
                prompt_len=prompt_len,
                gen_len=gen_len,
                batch_sizes=[1, 4] if self.args.smoke else self.args.batches or GPU_BATCHES[(scenario, kind, engine)],
                warmup=1 if fast or self.args.eager_warmup else 0,
                repeats=2 if fast else 1,
                device=self.device,
                dtype="float32" if self.args.smoke else "bfloat16",
                engine="fast" if fast else engine,
                compile=engine == "compiled",
            )
            model = self.model(kind, dtype)
            label = f"{kind} {engine}"
            rows = results[label] = []

            def measured(label=label, rows=rows):
                self.log(f"{scenario} {label}: {describe(rows[-1])}")
                self.write(f"{name}.json", self._scenario_payload(scenario, results))

            sweep(model, settings, label, rows, on_result=measured, deadline=deadline)
            release_engines(model)
        self.write(f"{name}.json", self._scenario_payload(scenario, results))
        return results

    def _scenario_payload(self, scenario, results):
        prompt_len, gen_len = self.scenarios[scenario]
        return {"scenario": scenario, "prompt_len": prompt_len, "gen_len": gen_len, "results": results}

    # -- profile ------------------------------------------------------------------------------------------

    def profile(self, batch: int):
        from torch.profiler import ProfilerActivity, profile

        prompt_len, _ = self.scenarios["decode-heavy"]
        new = 16 if self.args.smoke else self.args.profile_new_tokens
        model = self.model("block", torch.float32 if self.args.smoke else torch.bfloat16)
        ids = torch.randint(0, self.shape["vocab_size"], (batch, prompt_len), device=self.device)
        compiled = self.args.profile_engine == "compiled"
        arguments = {
            "max_new_tokens": new,
            "min_new_tokens": new,
            "do_sample": False,
            "pad_token_id": 0,
            "engine": "fast",
            "compile_steps": compiled,
        }
        model.generate(ids, **arguments)  # builds the buffers, compiles and captures the graphs
        synchronize(self.device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            model.generate(ids, **arguments)
            synchronize(self.device)
        model.release_generation_engine()
        sort = "cuda_time_total" if self.device.startswith("cuda") else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=80)
        header = (
            f"block {self.args.profile_engine} engine, batch {batch}, prompt {prompt_len}, {new} new tokens, "
            f"{self.facts.get('gpu', self.device)}, weights {self.weights}\n"
        )
        suffix = "-compiled" if compiled else ""
        (self.out / f"{self.shape_name}-profile-batch{batch}{suffix}.txt").write_text(header + table + "\n")
        self.log(f"profile at batch {batch} written")


def describe(result: dict) -> str:
    """One line for the log: a measurement, or why a batch size has none."""
    if "tokens_per_second" not in result:
        return (
            f"batch {result['batch_size']}: {'out of memory' if result.get('out_of_memory') else result.get('skipped')}"
        )
    warmup = f", warm-up {max(result['warmup_seconds']):.0f} s" if result.get("warmup_seconds") else ""
    return (
        f"batch {result['batch_size']}: {result['tokens_per_second']:,.0f} tok/s, "
        f"{(result['peak_memory_bytes'] or 0) / 2**30:.1f} GiB{warmup}"
    )


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def left_padded(lengths, vocab: int, device: str, pad: int = 0):
    generator = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, vocab, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids.to(device), mask.to(device)


def compare(fast: torch.Tensor, reference: torch.Tensor) -> dict:
    same = fast == reference
    first = [int(row.logical_not().nonzero()[0]) if not row.all() else None for row in same.cpu()]
    return {"identical": bool(same.all()), "token_agreement": float(same.float().mean()), "first_divergence": first}


# -- rendering --------------------------------------------------------------------------------------------


def roofline(config: dict, kind: str, prompt_len: int, gen_len: int, batch: int, card: str) -> float | None:
    """Upper bound on generated tokens/s for a batch: each phase (prefill, each decoding step) takes at least its
    FLOPs over the card's peak and its bytes (bf16 weights once per step for the whole batch, the KV cache read
    by every row) over the card's bandwidth. Block models: the default conversion (half the layers each, L_B 4,
    r 2), the r prefix positions in one token-decoder pass, then one pass per further token."""
    if card not in CARDS:
        return None
    peak, bandwidth = CARDS[card]
    d, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    head_dim = config.get("head_dim", d // config["num_attention_heads"])
    q_width, kv_width = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    layer = d * q_width * 2 + d * kv_width * 2 + 3 * d * config["intermediate_size"]  # matmul weights of one layer
    kv_bytes = 2 * kv_width * 2  # K and V of one position of one layer, bf16
    attention = 4 * q_width  # FLOPs per query position, per layer, per attended position (scores and values)

    def phase(flops: float, weight_bytes: float, cache_bytes: float) -> float:  # seconds for the whole batch
        return max(batch * flops / peak, (weight_bytes + batch * cache_bytes) / bandwidth)

    if kind == "vanilla":
        seconds = phase(
            2 * prompt_len * layers * layer + layers * attention * prompt_len**2 / 2 + 2 * vocab * d,
            2 * (layers * layer + vocab * d),
            layers * kv_bytes * prompt_len,
        )
        for step in range(gen_len):
            context = prompt_len + step
            seconds += phase(
                2 * (layers * layer + vocab * d) + layers * attention * context,
                2 * (layers * layer + vocab * d),
                layers * kv_bytes * context,
            )
        return batch * gen_len / seconds
    block_length, prefix = 4, 2
    lower, upper = layers // 2, layers - layers // 2
    extra = block_length * d * d + d * prefix * d  # embedder projection, prefix expansion
    blocks = prompt_len // block_length
    seconds = phase(
        2 * blocks * (lower * layer + extra) + lower * attention * blocks**2 / 2,
        2 * (lower * layer + extra),
        lower * kv_bytes * blocks,
    )
    for step in range(gen_len // block_length):
        context = blocks + step
        seconds += phase(
            2 * (lower * layer + extra) + lower * attention * context,
            2 * (lower * layer + extra),
            lower * kv_bytes * context,
        )  # block step
        window = prefix + block_length - 1
        seconds += phase(
            2 * window * upper * layer + upper * attention * window**2 / 2 + 2 * block_length * vocab * d,
            block_length * 2 * (upper * layer + vocab * d),
            upper * kv_bytes * window,
        )  # token steps
    return batch * gen_len / seconds


def card_of(facts: dict) -> str:
    return next((card for card in CARDS if card in facts.get("gpu", "")), "")


def render(folder: Path, merged_json: bool = True) -> str:
    """SHAPE-SCENARIO.png, summary.md and (merged_json) results.json from every part file in `folder`; returns
    the summary. Rows of one engine from several parts merge by batch size (a later file, by name, wins a tie).
    A run renders its own parts without results.json, which merges the parts of every run."""
    merged = {"shapes": {}}
    for path in sorted(folder.glob("*.json")):
        if path.name == "results.json":
            continue
        part = json.loads(path.read_text())
        shape = merged["shapes"].setdefault(
            part["shape"], {"config": part["config"], "environment": part["environment"], "scenarios": {}}
        )
        if "passed" in part:
            shape["check"] = part
        elif "scenario" in part:
            target = shape["scenarios"].setdefault(
                part["scenario"], {k: part[k] for k in ("prompt_len", "gen_len")} | {"results": {}}
            )
            for label, rows in part["results"].items():  # parts of one label (e.g. two runs' batches) merge by batch
                by_batch = {r["batch_size"]: r for r in target["results"].get(label, []) + rows}
                target["results"][label] = [by_batch[b] for b in sorted(by_batch)]
    for shape in merged["shapes"].values():
        card = card_of(shape["environment"])
        for data in shape["scenarios"].values():
            batches = sorted({r["batch_size"] for rows in data["results"].values() for r in rows})
            data["roofline"] = {
                kind: {
                    b: roofline(shape["config"], kind, data["prompt_len"], data["gen_len"], b, card) for b in batches
                }
                for kind in ("block", "vanilla")
            }
    if merged_json:
        (folder / "results.json").write_text(json.dumps(merged, indent=2) + "\n")
    lines = ["# Fast generation", ""]
    for name, shape in merged["shapes"].items():
        lines += [f"# {name}", "", f"Environment: {shape['environment']}", ""]
        if "check" in shape:
            check = shape["check"]
            lines += ["## Token checks", "", f"passed: {check['passed']}", ""]
            for key in (
                "block float32",
                "block bfloat16",
                "block compiled float32",
                "block compiled bfloat16",
                "vanilla float32",
            ):
                if key not in check:
                    continue
                lines.append(
                    f"- {key}: identical {check[key]['identical']}, token agreement "
                    f"{check[key]['token_agreement']:.4f}, first divergence per row {check[key]['first_divergence']}"
                )
            lines.append("")
        for scenario, data in shape["scenarios"].items():
            lines += [
                f"## {name} {scenario}: {data['prompt_len']} -> {data['gen_len']}",
                "",
                "| engine | batch | tokens/s | roofline tokens/s | ms/token | peak GiB | runs (s) |",
                "|---|---|---|---|---|---|---|",
            ]
            best = {}
            for label, rows in data["results"].items():
                for r in rows:
                    if "tokens_per_second" not in r:
                        why = "out of memory" if r.get("out_of_memory") else r.get("skipped")
                        lines.append(f"| {label} | {r['batch_size']} | {why} | | | | |")
                        continue
                    best[label] = max(best.get(label, 0), r["tokens_per_second"])
                    bound = data["roofline"][label.split()[0]][r["batch_size"]]
                    memory = f"{r['peak_memory_bytes'] / 2**30:.1f}" if r.get("peak_memory_bytes") else "n/a"
                    runs = ", ".join(f"{s:.2f}" for s in r["all_seconds"])
                    lines.append(
                        f"| {label} | {r['batch_size']} | {r['tokens_per_second']:,.0f} | "
                        f"{f'{bound:,.0f}' if bound else 'n/a'} | {r['ms_per_token']:.2f} | {memory} | {runs} |"
                    )
            lines.append("")
            for ours, theirs in (
                ("block fast", "vanilla fast"),
                ("block fast", "vanilla hf"),
                ("block fast", "block eager"),
                ("vanilla fast", "vanilla hf"),
                ("block compiled", "vanilla compiled"),
                ("block compiled", "block fast"),
                ("vanilla compiled", "vanilla fast"),
            ):
                if ours in best and theirs in best:
                    lines.append(f"- best {ours} / best {theirs}: {best[ours] / best[theirs]:.2f}x")
            lines.append("")
            draw(f"{name} {scenario}", data, shape["environment"], folder / f"{name}-{scenario}.png")
    summary = "\n".join(lines)
    (folder / "summary.md").write_text(summary + "\n")
    return summary


def draw(title: str, data: dict, facts: dict, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for label, rows in data["results"].items():
        points = [r for r in rows if "tokens_per_second" in r]
        if points:
            axes.plot(
                [r["batch_size"] for r in points], [r["tokens_per_second"] for r in points], marker="o", label=label
            )
    for kind, bounds in data.get("roofline", {}).items():
        points = sorted((int(b), v) for b, v in bounds.items() if v)
        if points:
            axes.plot(
                *zip(*points),
                linestyle="--",
                color="grey" if kind == "vanilla" else "black",
                alpha=0.6,
                label=f"{kind} roofline",
            )
    axes.set(
        xscale="log",
        yscale="log",
        xlabel="batch size",
        ylabel="generated tokens / s",
        title=f"{title}: {data['prompt_len']} -> {data['gen_len']}\n({facts.get('gpu', facts.get('device'))}, "
        f"{facts.get('weights')} weights)",
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main():
    args = parse()
    if args.render:
        print(render(args.render))
        return
    if args.out is None:
        raise SystemExit("--out is required (or --render FOLDER)")
    run = Run(args)
    run.log(f"{run.facts}")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    best_block = None
    for part in parts:
        if part == "check":
            run.check()
        elif part.split("/")[0] in run.scenarios:
            scenario, kind, engine = (part.split("/") + ["", ""])[:3]
            results = run.scenario(
                scenario, (kind,) if kind else ("block", "vanilla"), (engine,) if engine else DEFAULT_ENGINES
            )
            rows = [r for r in results.get("block fast", []) if "tokens_per_second" in r]
            if rows and scenario == "decode-heavy":
                best_block = max(rows, key=lambda r: r["tokens_per_second"])["batch_size"]
        elif part == "profile":
            run.profile(args.profile_batch or best_block or (4 if args.smoke else 4096))
        else:
            raise SystemExit(f"unknown part {part!r}")
    print(render(run.out, merged_json=False))


if __name__ == "__main__":
    main()
