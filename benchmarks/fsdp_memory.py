"""Per-GPU memory of uptraining under FSDP (full sharding, AdamW, bf16 compute), computed, not measured.

Parameter counts are exact: the source and its Block Transformer conversion are built on the meta device
from the config alone (nothing downloaded, nothing allocated). The formulas are in docs/results/fsdp-memory.md:

  sharded (divided by the world size N): 16 bytes a parameter = float32 weight 4 + float32 gradient 4
      + AdamW's two float32 moments 8 (the same 16 as ZeRO's bf16 weight 2 + bf16 gradient 2 + float32
      master 4 + moments 8);
  not sharded (any N): the root FSDP unit (embedding tables, LM head, norms, the block model's embedder
      and expansion) gathered for the whole step, and two decoder-layer units (the one running and the
      prefetched one), each at 8 bytes a parameter (bf16 weight 2 + bf16 gradient 2 + float32 gradient
      copy for the reduce-scatter 4); activations of one micro-batch (bf16, SDPA, no recomputation):
      per token and layer 22 D + 4 D_kv + 8 F bytes (D width, D_kv key/value width, F MLP width), over
      T tokens for every layer of a vanilla model and over T x (k + (n - k)(r + L_B - 1)) / L_B positions
      for a block model (k of n layers in the block decoder, L_B block length, r prefix length); the
      chunked LM-head loss, C x V x 16 bytes for C rows (at most 8,192) of V logits; with distillation,
      the frozen teacher in bf16 (2 bytes a source parameter) on every GPU.

    python benchmarks/fsdp_memory.py [--gpus 2,8,64] [--seq-len 2048] [--micro-batch 1] [--json OUT]
"""

import argparse
import json

import torch

GIB = 2**30
# Public configs (config.json of meta-llama/Llama-3.2-1B and meta-llama/Llama-3.1-8B), written out here.
SOURCES = {
    "Llama-3.2-1B": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    "Llama-3.1-8B": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
}
BLOCK_LENGTH, PREFIX_LENGTH, CHUNK_ROWS = 4, 2, 8192


def parameters(model) -> int:
    return sum({id(p): p.numel() for p in model.parameters()}.values())  # tied tensors once


def estimate(name: str, shape: dict, gpus: list[int], seq_len: int, micro_batch: int) -> list[dict]:
    from transformers import LlamaConfig

    from uptrain.architectures import decoder_layers
    from uptrain.models import initial_model
    from uptrain.recipe import ConvertSection

    config = LlamaConfig(**shape)
    n, dim, ffn = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * config.head_dim
    # activation bytes a token keeps per layer: 2 RMSNorms 6 D each (float32 input, bf16 output), attention
    # 8 D + 4 D_kv (projection input, q, k, v, SDPA output, o_proj input), SwiGLU MLP 2 D + 8 F
    per_token_layer = 22 * dim + 4 * kv + 8 * ffn
    section = ConvertSection(BLOCK_LENGTH, n // 2, "partition", PREFIX_LENGTH)
    with torch.device("meta"):
        models = {architecture: initial_model(config, architecture, section) for architecture in ("vanilla", "block")}
    source_params = parameters(models["vanilla"])
    rows = []
    for architecture, model in models.items():
        total = parameters(model)
        layers = decoder_layers(model)
        layer = sum(p.numel() for p in layers[0].parameters())
        root = total - layer * len(layers)
        if architecture == "vanilla":
            positions = n * seq_len
        else:
            k = n // 2
            positions = seq_len * (k + (n - k) * (PREFIX_LENGTH + BLOCK_LENGTH - 1)) / BLOCK_LENGTH
        chunk = min(CHUNK_ROWS, micro_batch * (seq_len - 1))
        fixed = {
            "root_unit": 8 * root,
            "two_layer_units": 2 * 8 * layer,
            "activations": micro_batch * positions * per_token_layer,
            "loss_chunk": chunk * config.vocab_size * 16,
        }
        for world in gpus:
            sharded = 16 * total / world
            rows.append(
                {
                    "source": name,
                    "architecture": architecture,
                    "gpus": world,
                    "parameters": total,
                    "root_parameters": root,
                    "layer_parameters": layer,
                    "sharded_states_gib": sharded / GIB,
                    **{f"{k}_gib": v / GIB for k, v in fixed.items()},
                    "total_gib": (sharded + sum(fixed.values())) / GIB,
                    "teacher_gib": 2 * source_params / GIB,
                }
            )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="2,8,64")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    gpus = [int(g) for g in args.gpus.split(",")]
    rows = [
        row for name, shape in SOURCES.items() for row in estimate(name, shape, gpus, args.seq_len, args.micro_batch)
    ]
    print(f"micro-batch {args.micro_batch} x {args.seq_len} tokens; GiB per GPU")
    print(
        "| source | model | parameters | GPUs | sharded states | root unit | 2 layer units | activations "
        "| loss chunk | total | + teacher (distillation) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['source']} | {r['architecture']} | {r['parameters'] / 1e9:.3f}B | {r['gpus']} "
            f"| {r['sharded_states_gib']:.1f} | {r['root_unit_gib']:.1f} | {r['two_layer_units_gib']:.1f} "
            f"| {r['activations_gib']:.1f} | {r['loss_chunk_gib']:.1f} | **{r['total_gib']:.1f}** "
            f"| {r['teacher_gib']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
