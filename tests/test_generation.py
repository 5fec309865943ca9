"""Contract 5: block-cached generation equals teacher forcing, for every family and the real SmolLM2."""

import pytest
import torch
from families import FAMILIES, tiny_tokenizer
from transformers import TextStreamer

BLOCK = 4  # the default block length the `converted` fixture uses
NEW = 11


def teacher_forced_argmax(model, sequence, prompt_length):
    with torch.no_grad():
        logits = model(sequence).logits
    return logits[:, prompt_length - 1 : -1].argmax(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_teacher_forcing(family, model_of):
    model = model_of(family)
    for length in range(1, 2 * BLOCK + 2):
        torch.manual_seed(length)
        prompt = torch.randint(4, 128, (2, length))
        output = model.generate(prompt, max_new_tokens=NEW, do_sample=False, eos_token_id=None)
        assert output.shape == (2, length + NEW)
        assert torch.equal(output[:, :length], prompt)
        assert torch.equal(output[:, length:], teacher_forced_argmax(model, output, length)), length


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_each_prompt_alone(family, model_of):
    model = model_of(family)
    torch.manual_seed(5)
    rows = [torch.randint(4, 128, (n,)) for n in (3, 9, 5, 1, 4)]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), 3)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    assert batch.shape == (len(rows), width + NEW)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=NEW, do_sample=False, eos_token_id=None)
        assert torch.equal(batch[i, width:], alone[0, len(row) :]), i


def test_eos_stops_a_row_and_min_new_tokens(model_of):
    model = model_of("llama")
    torch.manual_seed(6)
    prompt = torch.randint(4, 128, (1, 6))
    free = model.generate(prompt, max_new_tokens=NEW, do_sample=False, eos_token_id=None)[0, 6:]
    eos = int(free[2])
    first = int((free == eos).nonzero()[0])
    stopped = model.generate(prompt, max_new_tokens=NEW, do_sample=False, eos_token_id=[eos, 127], pad_token_id=0)[
        0, 6:
    ]
    assert stopped.shape == (NEW,)
    assert torch.equal(stopped[: first + 1], free[: first + 1])
    assert (stopped[first + 1 :] == 0).all()

    later = model.generate(prompt, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, min_new_tokens=first + 2)[
        0, 6:
    ]
    assert (later[: first + 2] != eos).all()


def test_sampling_is_seeded_and_top_k_1_is_greedy(model_of):
    model = model_of("qwen2")
    prompt = torch.randint(4, 128, (3, 5))
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(
            model.generate(prompt, max_new_tokens=NEW, do_sample=True, temperature=1.5, top_p=0.9, eos_token_id=None)
        )
    assert torch.equal(runs[0], runs[1])
    greedy = model.generate(prompt, max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    assert not torch.equal(runs[0], greedy)
    top1 = model.generate(prompt, max_new_tokens=NEW, do_sample=True, top_k=1, eos_token_id=None)
    assert torch.equal(top1, greedy)


def test_token_decoder_positions_match_training(model_of):
    """The reference code gives the token decoder other position ids in generation than in training."""
    model = model_of("gpt2")  # learned absolute positions: a wrong id would change the output
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["position_ids"][0].tolist())

    handle = model.token_decoder.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(torch.arange(4, 12)[None])
        training = seen[:]
        seen.clear()
        model.generate(torch.arange(4, 12)[None], max_new_tokens=BLOCK, do_sample=False, eos_token_id=None)
    finally:
        handle.remove()
    window = list(range(model.config.prefix_length + BLOCK - 1))
    assert training == [window]
    assert sum(seen, []) == window  # prefix first, then one position per fed token


def test_streamer_prints_the_new_text(model_of, capsys):
    model = model_of("llama")
    tokenizer = tiny_tokenizer()
    prompt = tokenizer("hello", return_tensors="pt").input_ids
    output = model.generate(
        prompt, max_new_tokens=7, do_sample=False, eos_token_id=None, streamer=TextStreamer(tokenizer, skip_prompt=True)
    )
    printed = capsys.readouterr().out
    assert printed.strip() == tokenizer.decode(output[0, prompt.shape[1] :]).strip()


def test_finished_rows_leave_the_batch(model_of):
    """A row that hits EOS is dropped between blocks; the others go on exactly as when alone."""
    model = model_of("qwen2")
    torch.manual_seed(8)
    prompts = torch.randint(4, 128, (3, 5))
    free = model.generate(prompts, max_new_tokens=3 * NEW, do_sample=False, eos_token_id=None)[:, 5:]
    eos = int(free[0, 1])  # row 0 stops early; the others may or may not meet this token
    seen_batches = []
    handle = model.block_decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen_batches.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True
    )
    try:
        stopped = model.generate(prompts, max_new_tokens=3 * NEW, do_sample=False, eos_token_id=eos, pad_token_id=0)[
            :, 5:
        ]
    finally:
        handle.remove()
    for row in range(3):
        alone = model.generate(
            prompts[row : row + 1], max_new_tokens=3 * NEW, do_sample=False, eos_token_id=eos, pad_token_id=0
        )
        assert torch.equal(stopped[row], alone[0, 5:])
        hits = (free[row] == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else free.shape[1]
        assert torch.equal(stopped[row, :end], free[row, :end]) and (stopped[row, end:] == 0).all()
    assert seen_batches[0] == 3 and min(seen_batches) < 3


def test_generation_config_and_unknown_arguments(model_of):
    from transformers import GenerationConfig

    model = model_of("gemma")
    prompt = torch.randint(4, 128, (2, 6))
    settings = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    by_config = model.generate(prompt, generation_config=settings)
    assert by_config.shape == (2, 11)
    assert torch.equal(by_config, model.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=None))
    with pytest.raises(TypeError, match="max_new_tokenz"):
        model.generate(prompt, max_new_tokenz=3)
