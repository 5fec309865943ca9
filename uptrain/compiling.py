"""Every compile decision of a training run, in one function: `apply_compile`."""

import torch

from .architectures import decoder_layers, decoder_stacks
from .objective import NextTokenObjective
from .window_attention import use_window_attention


def apply_compile(objective: NextTokenObjective, *, compile: bool, tuning: bool, sharded: bool) -> None:
    """Prepare what a training step runs for the compiler, in place (parameter names stay as they are).

    The rule:
    - Always: a block model's token decoder attends with `window_attention`, written for the compiler; an
      eager run uses it too, so that compiled and eager runs compute one function.
    - With `compile`:
      - each decoder stack is compiled whole, one graph per stack, never layer by layer (each layer's own
        `layer_idx` would make dynamo recompile per layer, past its limit, and leave the rest eager). These
        graphs serve evaluation, the plain loss and FSDP;
      - the fast loss's states of student and teacher are compiled as one graph each, from token ids to final
        states, so that the embeddings, the window gathers and the casts around the stacks fuse with them,
        and so are the alignment source's states; not under FSDP (`sharded`), whose per-layer hooks cut
        graphs anyway;
      - the chunk loss and its gradient are compiled into one fused function per chunk;
      - under FSDP the recompile limit is raised above twice the layer count: FSDP's hooks cut each stack's
        graph at every layer, and each layer compiles apart;
      - with `tuning`, inductor times block sizes for each fused GPU kernel (coordinate-descent tuning)
        instead of taking its heuristics' choice: faster steps for minutes more of compilation at every
        start (docs/results/training-throughput.md). CPU kernels are not tuned. It is read when the graphs are
        built, at the first step, so it is set for the process.
    """
    model = objective.model
    use_window_attention(model)
    if not compile:
        return
    for stack in decoder_stacks(model):
        stack.compile()
    if sharded:
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # older torch
        setattr(config, name, max(getattr(config, name), 2 * len(decoder_layers(model)) + 8))
    else:
        objective.student_rows = torch.compile(objective.student_rows)
        objective.teacher_rows = torch.compile(objective.teacher_rows)
        if objective.alignment is not None:
            objective.alignment.source_states = torch.compile(objective.alignment.source_states)
    objective.chunk_gradient.function = torch.compile(objective.chunk_gradient.function)
    if tuning:
        import torch._inductor.config as inductor

        inductor.coordinate_descent_tuning = True
