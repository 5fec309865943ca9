"""`uptrain generate` on a converted model and on a plain source."""

from transformers import AutoModelForCausalLM, AutoTokenizer


def test_generate_streams_one_prompt_and_batches_several(tiny_source, run_cli, tmp_path):
    source_folder, _ = tiny_source("llama")
    out = tmp_path / "b4"
    assert run_cli("convert", source_folder, out).exit_code == 0

    result = run_cli("generate", out, "hello wor", "--max-new-tokens", 6)
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    ids = tokenizer("hello wor", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    expected = tokenizer.decode(generated, skip_special_tokens=True)
    assert result.stdout.strip() == expected.strip()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first line\n\nsecond\n")
    result = run_cli("generate", out, "zero", "--file", prompts, "--max-new-tokens", 4, "--temperature", 0.8,
                     "--batch-size", 2)
    assert result.exit_code == 0, result.output
    headers = [line for line in result.stdout.splitlines() if line.startswith("### ")]
    assert headers == ["### zero", "### first line", "### second"]

    plain = run_cli("generate", source_folder, "hello", "--max-new-tokens", 3)
    assert plain.exit_code == 0, plain.output


def test_generate_needs_a_prompt(tiny_source, run_cli):
    source_folder, _ = tiny_source("llama")
    result = run_cli("generate", source_folder)
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: give at least one prompt, or --file with one prompt a line"
