"""The token decoder's window attention, written several ways, timed inside a compiled decoder layer.

Training's token decoder attends within windows of r + L - 1 positions (5 in the recipe), tens of
thousands of windows a micro-batch; in the eighth session's profile the backward kernel of
`uptrain.window_attention` took 7% of a step. This script runs one real decoder layer of the source's
shape (random weights, float32 stream, bf16 autocast, compiled as the trainer compiles it) over the
windows of one micro-batch, once per way of writing the attention, and reports forward + backward time
and peak memory; "none" (the attention replaced by passing the queries through) is the rest of the layer.
Each way is first checked against the current one in float32 (outputs and input gradients).

    python benchmarks/window_attention_kernels.py CONFIG_DIR --output RESULTS.json [--windows 16384]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from uptrain.window_attention import window_attention  # noqa: E402


def _causal(scores: torch.Tensor) -> torch.Tensor:
    """scores (..., T, S), T == S -> float32 probabilities, causal."""
    length = scores.shape[-1]
    keep = torch.ones(length, length, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(~keep, float("-inf")).softmax(-1)


def unrolled(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """One product and sum over d per key position: no reduction over the window's rows in the forward pass."""
    batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    q = query.float().view(batch, kv_heads, heads // kv_heads, length, head_dim)  # (B, Hkv, G, T, d)
    k, v = key.float()[:, :, None], value.float()[:, :, None]  # (B, Hkv, 1, S, d)
    scale = head_dim**-0.5 if scaling is None else scaling
    scores = torch.stack([(q * k[:, :, :, s : s + 1]).sum(-1) for s in range(key.shape[2])], -1) * scale
    probs = _causal(scores)  # (B, Hkv, G, T, S)
    out = sum(probs[..., s : s + 1] * v[:, :, :, s : s + 1] for s in range(key.shape[2]))  # (B, Hkv, G, T, d)
    return out.to(query.dtype).reshape(batch, heads, length, head_dim).transpose(1, 2).contiguous(), None


def _expand(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, S, d) -> (B, Hkv * groups, S, d), each key-value head repeated for its query heads."""
    batch, kv_heads, length, head_dim = x.shape
    return x[:, :, None].expand(batch, kv_heads, groups, length, head_dim).reshape(batch, -1, length, head_dim)


def expanded(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Broadcast products with the key-value heads repeated first (one head index instead of two)."""
    groups = query.shape[1] // key.shape[1]
    k, v = _expand(key.float(), groups), _expand(value.float(), groups)  # (B, H, S, d)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    probs = _causal((query.float()[:, :, :, None] * k[:, :, None]).sum(-1) * scale)  # (B, H, T, S)
    out = (probs[..., None] * v[:, :, None]).sum(-2)  # (B, H, T, d)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def matmul(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Batched matmuls (bf16 under autocast), softmax in float32."""
    groups = query.shape[1] // key.shape[1]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    probs = _causal((query @ _expand(key, groups).transpose(-1, -2)).float() * scale)
    out = probs.to(value.dtype) @ _expand(value, groups)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def sdpa(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """torch's SDPA (under autocast: bf16, cuDNN or flash kernels on a GPU)."""
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def none(module, query, key, value, attention_mask, **kwargs):
    """No attention: the queries pass through, so the time is the rest of the layer's."""
    return query.transpose(1, 2).contiguous(), None


WAYS = {"current": window_attention, "unrolled": unrolled, "expanded": expanded, "matmul": matmul, "sdpa": sdpa,
        "none": none}


def make_layer(config_dir: Path, device: str):
    """A Llama decoder layer of the source's shape and its rotary embedding for window positions."""
    from transformers import AutoConfig, AttentionInterface
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    for name, way in WAYS.items():
        AttentionInterface.register(f"bench_{name}", way)
    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device)
    with torch.no_grad():
        for p in layer.parameters():  # RMSNorm weights start at 1; give every weight some spread
            torch.nn.init.normal_(p, mean=float(p.mean()), std=0.02)
    return config, layer, LlamaRotaryEmbedding(config).to(device)


def step_fn(config, layer, rotary, way: str, autocast: bool):
    """(hidden (N, W, D) float32, upstream gradient) -> runs forward and backward of the layer."""
    def run(hidden, upstream):
        config._attn_implementation = f"bench_{way}"
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = layer(hidden, attention_mask=None, position_embeddings=rotary(hidden, positions))
            out = out[0] if isinstance(out, tuple) else out
            loss = (out.float() * upstream).sum()
        loss.backward()
        return out
    return run


def check(config, layer, rotary, device: str, windows: int = 64) -> dict:
    """Each way against the current one in float32: max |difference| / max |value| of output and gradients."""
    hidden = torch.randn(windows, 5, config.hidden_size, device=device)
    upstream = torch.randn_like(hidden)
    results = {}
    for way in WAYS:
        if way == "none":
            continue
        x = hidden.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        out = step_fn(config, layer, rotary, way, autocast=False)(x, upstream)
        results[way] = (out.detach(), x.grad, layer.self_attn.k_proj.weight.grad.clone())
    reference = results["current"]
    return {way: [float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, reference)]
            for way, got in results.items()}


def time_way(config, layer, rotary, way: str, windows: int, device: str, repeats: int) -> dict:
    run = torch.compile(step_fn(config, layer, rotary, way, autocast=True))
    hidden = torch.randn(windows, 5, config.hidden_size, device=device, requires_grad=True)
    upstream = torch.randn(windows, 5, config.hidden_size, device=device)
    for _ in range(3):  # compilation, then warm-up
        run(hidden, upstream)
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(hidden, upstream)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            run(hidden, upstream)
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"ms_median": statistics.median(times), "ms_min": min(times), "peak_gib": peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config_dir", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=16384, help="windows of 5 positions: micro-batch 32 x 2048 / 4")
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    config, layer, rotary = make_layer(args.config_dir, args.device)
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "windows": args.windows,
              "float32_check": check(config, layer, rotary, args.device), "ways": {}}
    print("float32, max |diff| / max |value| of (output, input grad, k_proj grad) against current:")
    for way, diffs in report["float32_check"].items():
        print(f"  {way:9s} " + "  ".join(f"{d:.1e}" for d in diffs))
    for way in args.ways.split(","):
        torch._dynamo.reset()
        report["ways"][way] = time_way(config, layer, rotary, way, args.windows, args.device, args.repeats)
        print(f"{way:9s} forward+backward {report['ways'][way]['ms_median']:.3f} ms", flush=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
