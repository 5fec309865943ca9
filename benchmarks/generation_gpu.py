"""Generation throughput on a GPU: `uptrain bench` reports -> docs/generation-gpu.md (+ JSON and PNG in docs/bench/).

The reports come from runs on the GPU machine (commands in the page); a scenario's model and baseline may come
from separate runs (one command each, to fit the machine's 10-minute limit), merged here. Run here:
    python benchmarks/generation_gpu.py REPORT.json [...] [--as-baseline REPORT.json ...]
(--as-baseline: a report of one model that is the baseline of its scenario.)
"""

import argparse
import json
from pathlib import Path

from uptrain.bench import draw, format_table, speedups

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def merge(reports: list[Path], baselines: list[Path]) -> dict[str, dict]:
    """scenario -> one report holding the model and the baseline, whichever files they came from. Each result
    keeps the warm-up and repeat counts of the run that measured it, since runs may differ in them."""
    merged: dict[str, dict] = {}
    for path, is_baseline in [(p, False) for p in reports] + [(p, True) for p in baselines]:
        report = json.loads(path.read_text())
        protocol = {key: report["settings"][key] for key in ("warmup", "repeats")}
        target = merged.setdefault(report["settings"]["scenario"], {"environment": report["environment"]})
        target.setdefault("settings", report["settings"])
        roles = {"baseline": report["model"]} if is_baseline else {k: report[k] for k in ("model", "baseline") if k in report}
        for role, part in roles.items():
            entry = target.setdefault(role, {**part, "results": []})
            entry["results"] = sorted(entry["results"] + [{**r, **protocol} for r in part["results"]],
                                      key=lambda r: r["batch_size"])
    for report in merged.values():
        if "model" in report and "baseline" in report:
            report["speedup"] = speedups(report["model"]["results"], report["baseline"]["results"])
    return merged


COMMANDS = """\
uptrain bench .device/smollm2-b4 --baseline .device/smollm2-config --random-init --scenario prefill-heavy \\
    --batch-size auto --repeats 3 --output prefill-heavy.json
uptrain bench .device/smollm2-config --random-init --scenario decode-heavy --batch-size 256,512 --warmup 1 --repeats 1
    # (stopped by the 10-minute limit during batch 512's timed run; batch 512 was then measured alone:)
uptrain bench .device/smollm2-config --random-init --scenario decode-heavy --batch-size 512 --warmup 0 --repeats 1
uptrain bench .device/smollm2-b4 --random-init --scenario decode-heavy --batch-size 256,1024,4096 --warmup 1 --repeats 1"""


def page(merged: dict[str, dict]) -> str:
    environment = next(iter(merged.values()))["environment"]
    lines = [
        "# Generation throughput on a GPU",
        "",
        f"`uptrain bench` on one {environment.get('gpu')} (torch {environment['torch']}, transformers "
        f"{environment['transformers']}), bf16, SDPA, random weights of the SmolLM2-135M shape: the vanilla model "
        "(30 layers) against its Block Transformer conversion (15/15 layers, L_B = 4, r = 2). Both generate with "
        "transformers' dynamic caches and plain eager PyTorch: no static cache, no CUDA graphs. Random prompts, "
        "exactly the scenario's new tokens a row (EOS suppressed), greedy. Tokens/s counts generated tokens; "
        "ms/token is a run's time over its new tokens (prefill included); memory is torch's peak allocation.",
        "",
        "Commands (on the GPU machine; configs carried in `.device/`, built by `uptrain convert default`):",
        "",
        "```",
        COMMANDS,
        "```",
        "",
        "Rendered with `python benchmarks/generation_gpu.py` from the JSON reports in `docs/bench/`; plots beside them.",
        "",
    ]
    for scenario, report in sorted(merged.items()):
        settings = report["settings"]
        lines += [f"## {scenario}: {settings['prompt_len']} -> {settings['gen_len']} tokens", "",
                  f"![throughput against batch size](bench/{scenario}.png)", "", format_table(report), ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, nargs="+")
    parser.add_argument("--as-baseline", type=Path, nargs="*", default=[])
    parser.add_argument("--notes", type=Path, help="Markdown appended to the page: what the numbers mean.")
    args = parser.parse_args()
    out = DOCS / "bench"
    out.mkdir(parents=True, exist_ok=True)
    merged = merge(args.reports, args.as_baseline)
    for scenario, report in merged.items():
        (out / f"{scenario}.json").write_text(json.dumps(report, indent=2) + "\n")
        draw(report, out / f"{scenario}.png")
    text = page(merged) + ("\n" + args.notes.read_text() if args.notes else "")
    (DOCS / "generation-gpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
