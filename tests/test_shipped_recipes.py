"""The shipped recipes: `uptrain recipes` lists what the checkout's recipes/ folder holds, `uptrain recipes copy`
writes an editable copy, and `uptrain train` takes a shipped name where no file of that name exists."""

from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def first_comment(path: Path) -> str:
    return next(line for line in path.read_text().splitlines() if line.startswith("#")).lstrip("# ").strip()


def test_listing_names_every_shipped_file_with_its_first_comment_line(run_cli):
    result = run_cli("recipes")
    assert result.exit_code == 0, result.output
    listed = dict(line.split(maxsplit=1) for line in result.stdout.splitlines())
    expected = {path.stem: path for path in RECIPES.glob("*.yaml")}
    expected |= {f"accelerate/{path.stem}": path for path in (RECIPES / "accelerate").glob("*.yaml")}
    assert set(listed) == set(expected) >= {"tiny-cpu", "smollm2-135m-b4", "accelerate/ddp", "accelerate/fsdp"}
    for name, path in expected.items():
        assert listed[name] == first_comment(path), name


def test_copy_writes_the_file_and_keeps_an_existing_one(run_cli, tmp_path):
    target = tmp_path / "mine" / "tiny.yaml"
    assert run_cli("recipes", "copy", "tiny-cpu", target).exit_code == 0
    assert target.read_text() == (RECIPES / "tiny-cpu.yaml").read_text()

    target.write_text("# edited\n")
    refused = run_cli("recipes", "copy", "smollm2-135m-b4", target)
    assert refused.exit_code == 1
    assert refused.stderr.strip() == f"error: {target} exists: pass --overwrite to replace it"
    assert target.read_text() == "# edited\n"
    assert run_cli("recipes", "copy", "accelerate/fsdp", target, "--overwrite").exit_code == 0
    assert target.read_text() == (RECIPES / "accelerate" / "fsdp.yaml").read_text()
    assert [p.name for p in target.parent.iterdir()] == ["tiny.yaml"]  # nothing half-written beside it

    under_a_file = run_cli("recipes", "copy", "tiny-cpu", target / "x.yaml")
    assert under_a_file.exit_code == 1 and under_a_file.stderr.count("\n") == 1
    assert under_a_file.stderr.startswith(f"error: cannot write {target / 'x.yaml'}: ")

    unknown = run_cli("recipes", "copy", "tiny", tmp_path / "other.yaml")
    assert unknown.exit_code == 1 and unknown.stderr.count("\n") == 1
    assert unknown.stderr.startswith("error: no shipped recipe 'tiny': choose from ") and "tiny-cpu" in unknown.stderr
    assert not (tmp_path / "other.yaml").exists()


def test_train_takes_a_shipped_name_a_file_of_that_name_first(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the shipped tiny-cpu recipe (global batch 4) read and checked: a micro-batch of 3 does not divide it
    result = run_cli("train", "tiny-cpu", "micro_batch_size=3")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: recipe key 'global_batch_size' must be a multiple of 'micro_batch_size'"

    (tmp_path / "tiny-cpu").write_text("source: default\ndata: d\noutput_dir: o\nmax_steps: 1\nlocal: 1\n")
    result = run_cli("train", "tiny-cpu")
    assert result.exit_code == 1 and result.stderr.strip() == "error: unknown recipe key 'local'"


def test_train_with_an_unknown_recipe_names_the_shipped_ones(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("train", "tiny-gpu", "lr=1e-4")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: no recipe file tiny-gpu, and no shipped recipe of that name (shipped: smollm2-135m-b4, tiny-cpu)"
    ]
    assert list(tmp_path.iterdir()) == []
