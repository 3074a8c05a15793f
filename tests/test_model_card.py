"""The model card in `final/`: written from the manifest when a stage finishes, refreshed when an eval of
the checkpoint finishes, never changing the checkpoint's fingerprint; and `push_to_hub` pushes `final/`.

Pushing itself needs the hub, which these machines cannot reach: the push is tested up to the hub
call (offline, it fails as one line naming the repo and the command that retries it, after the stage is
recorded done and its card written). TRL's own push of the stage folder never runs.
"""

from conftest import sdd, sdd_process, set_tiny

from sdd.manifest import RunDir, fingerprint


def test_card_is_written_at_finish_and_refreshed_by_an_eval(toy_run):
    set_tiny(toy_run)
    sdd("sft", "--run", toy_run, "--role", "student")
    final = toy_run / "sft-student" / "final"
    card = (final / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    assert "`run/toy-init`" in card and "`run/sft-student`" in card  # the lineage
    record = RunDir(toy_run).record("sft-student")
    assert f"learning_rate: {record.config['trl']['learning_rate']}" in card  # the config as resolved
    assert "## Reproduce" in card and record.command[-1] in card  # the command as recorded
    assert "No evaluation" in card
    recorded = record.outputs["student"].fingerprint
    assert fingerprint(final) == recorded  # the card is not part of the checkpoint's content

    sdd("eval", "--run", toy_run, "--role", "student", "--benchmark", "toy-test", "--samples", "2",
        "--limit", "8", "--max-new-tokens", "24")
    evaluated = RunDir(toy_run).record("eval-sft-student-toy-test")
    card = (final / "README.md").read_text()
    assert "No evaluation" not in card
    row = next(line for line in card.splitlines() if line.startswith("| **run/sft-student** (this) | toy-test"))
    assert f"{evaluated.metrics['avg@2']:.3f} (avg@2)" in row
    assert fingerprint(final) == recorded


def test_push_to_hub_pushes_final_and_fails_offline_as_one_line(toy_run):
    set_tiny(toy_run)
    result = sdd_process("sft", "--run", toy_run, "--role", "student", "--set", "push_to_hub=true",
                         "--set", "hub_model_id=someone/toy-student", "--set", "max_steps=2")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "someone/toy-student" in lines[0] and "hf upload someone/toy-student" in lines[0]
    record = RunDir(toy_run).record("sft-student")
    assert record.done  # the checkpoint is good; only the upload failed
    assert record.config["sdd"]["push_to_hub"] is True and record.config["trl"]["push_to_hub"] is False
    final = toy_run / "sft-student" / "final"
    assert (final / "README.md").is_file() and (final / "model.safetensors").is_file()
