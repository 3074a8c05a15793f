"""The CLI is built from the options dataclasses: each option's help is the help its field declares."""

import dataclasses
import json

import pytest
import typer

from sdd import cli
from sdd import config as cfg
from sdd.stages.common import DataOptions
from sdd.stages.distill import DistillOptions
from sdd.stages.eval import EvalOptions
from sdd.stages.rl import RlOptions
from sdd.stages.sft import SftOptions
from sdd.stages.warmup import WarmupOptions

STAGE_OPTIONS = {"sft": SftOptions, "teacher-rl": RlOptions, "student-rl": RlOptions, "warmup": WarmupOptions,
                 "distill": DistillOptions, "eval": EvalOptions}


def stage_command(stage: str):
    return typer.main.get_command(cli.app).commands[stage]


@pytest.mark.parametrize("stage", STAGE_OPTIONS)
def test_every_stage_option_has_its_fields_help(stage):
    """A stage's own options carry exactly their field's help; the rest are the options every stage shares."""
    options_cls = STAGE_OPTIONS[stage]
    fields = {f.name for f in dataclasses.fields(options_cls)}
    own = 0
    for param in stage_command(stage).params:
        if param.param_type_name != "option" or param.name == "help":
            continue
        assert param.help, f"sdd {stage} {param.opts[0]} has no help"
        if param.name in cli.COMMON:
            continue
        assert param.name in fields, f"sdd {stage} {param.opts[0]} is neither a shared option nor a field"
        assert param.help == cfg.help_for(options_cls, param.name), param.opts[0]
        own += 1
    assert own >= {"eval": 13}.get(stage, 4)


@pytest.mark.parametrize("options_cls", sorted({*STAGE_OPTIONS.values(), DataOptions}, key=lambda c: c.__name__))
def test_every_options_field_declares_its_help(options_cls):
    """--help-config lists these, and a flag made for any of them takes its help from here."""
    missing = [f.name for f in dataclasses.fields(options_cls) if not f.metadata.get("help", "").strip()]
    assert not missing, f"{options_cls.__name__} fields without help: {missing}"


def test_help_screen_shows_the_fields_help():
    """What a user reads under `sdd eval --help` is the dataclass's text (and one eval option, top_k, had none)."""
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli.app, ["eval", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    for field in ("top_k", "samples", "data_dir"):
        assert cfg.help_for(EvalOptions, field) in result.output
    assert cfg.help_for(EvalOptions, "data_dir") == cfg.help_for(DataOptions, "data_dir")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`sdd ...` through the entry point in this process: (exit code, stdout, stderr)."""
    try:
        cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_config_lists_sdd_and_trl_fields_with_type_default_and_help(capsys, tmp_path, monkeypatch):
    """`sdd distill --help-config`: no run dir needed, nothing written; every field `--set` accepts, TRL's with
    TRL's own help, sdd's recipe default where it sets one."""
    from trl import DistillationConfig

    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "distill", "--help-config", "--json")
    assert code == 0 and list(tmp_path.iterdir()) == []
    listed = json.loads(out)
    sdd_group, trl_group = listed["groups"]
    assert (sdd_group["class"], trl_group["class"]) == ("DistillOptions", "DistillationConfig")
    assert [f["name"] for f in sdd_group["fields"]] == [f.name for f in dataclasses.fields(DistillOptions)]
    assert [f["name"] for f in trl_group["fields"]] == [f.name for f in dataclasses.fields(DistillationConfig) if f.init]
    trl_fields = {f["name"]: f for f in trl_group["fields"]}
    trl_help = {f.name: " ".join(f.metadata["help"].split()) for f in dataclasses.fields(DistillationConfig)}
    assert all(field["help"] == trl_help[name] and field["help"] for name, field in trl_fields.items())
    assert trl_fields["beta"]["type"] == "float" and "reverse KL" in trl_fields["beta"]["help"]
    assert trl_fields["weight_decay"]["default"] == 0.1 and trl_fields["weight_decay"]["class_default"] == 0.0
    estimator = {f["name"]: f for f in sdd_group["fields"]}["estimator"]
    assert estimator == {"name": "estimator", "type": "str", "default": "full-vocab",
                         "help": cfg.help_for(DistillOptions, "estimator")}
    assert {f["name"]: f for f in sdd_group["fields"]}["teacher"]["flag"] == "--teacher"

    code, text, _ = run_cli(capsys, "distill", "--help-config")
    assert code == 0
    assert "\n  estimator  (str, default \"full-vocab\")\n" in text
    assert "\n  beta  (float, default 1.0)\n      Interpolation coefficient" in text
    assert "\n  weight_decay  (float, default 0.1, TRL's 0.0)\n" in text
    assert "\n  teacher  --teacher  (str | None, default null)\n" in text


def test_eval_help_config_has_no_trl_part_and_a_stage_still_needs_its_run(capsys):
    code, out, _ = run_cli(capsys, "eval", "--help-config", "--json")
    assert code == 0
    (group,) = json.loads(out)["groups"]
    assert group["class"] == "EvalOptions" and len(group["fields"]) == len(dataclasses.fields(EvalOptions))
    code, out, err = run_cli(capsys, "eval", "--limit", "3")
    assert code == 2 and out == "" and err == "error: missing option '--run': the run directory (sdd eval --help lists the options)\n"


def test_unknown_set_key_names_the_closest_fields(capsys, tmp_path):
    code, _, err = run_cli(capsys, "distill", "--run", tmp_path / "run", "--set", "bta=0.5", "--print-config")
    assert code == 2
    assert err.startswith("error: unknown option 'bta' in --set: not an sdd option nor a DistillationConfig field "
                          "(did you mean beta")


def test_every_toy_job_hands_its_stage_what_its_command_line_means(tmp_path):
    """`sdd run` calls a job's stage with StageArgs built from the job; `sdd <job.argv>` (a launcher, Slurm, a
    user) parses into StageArgs. For every job of the toy plan (with a data_dir, so every flag occurs) the two
    are equal, and toy init's command line means toy_init.run's defaults, which the in-process job uses."""
    import inspect
    from pathlib import Path

    import yaml

    from sdd.experiment import recipe as recipes
    from sdd.stages import run, toy_init

    toy = yaml.safe_load((Path(__file__).resolve().parent.parent / "examples" / "recipes" / "toy.yaml").read_text())
    toy["data_dir"] = "../shared/data/"
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(toy))
    jobs, _ = recipes.plan(recipes.load(tmp_path / "toy.yaml"), tmp_path / "root", seeds=1)
    kinds = set()
    for job in jobs:
        kinds.add(job.stage)
        if job.stage == "toy-init":
            command = typer.main.get_command(cli.app).commands["toy"].commands["init"]
            with command.make_context("init", job.argv[2:]) as ctx:
                parsed = ctx.params
            defaults = {name: p.default for name, p in inspect.signature(toy_init.run).parameters.items()}
            assert parsed["run"] == job.run_dir
            assert parsed["seed"] == defaults["seed"] and parsed["force"] == defaults["force"]
            assert all(parsed[k] is None for k in ("min_terms", "max_terms", "train", "test", "slip_rate"))
            continue
        stage, parsed = cli.parse_stage_args(job.argv)
        assert stage == job.stage
        assert parsed == run.stage_args(job), job.id
        assert parsed.cli.get("data_dir") == "../shared/data/" and parsed.config_file
    assert kinds == {"toy-init", "sft", "teacher-rl", "warmup", "distill", "student-rl", "eval"}
