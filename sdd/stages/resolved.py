"""A stage's fully resolved configuration, without running it: `sdd <stage> ... --print-config`.

Every value a stage would train with comes from layers (sdd's defaults, the run dir's
config.yaml, the recipe, `--config`, the command line, `--set`) plus what sdd derives from
them (GRPO's `steps_per_generation` from `updates_per_rollout`, warmup's `max_length` from the
prompt and completion limits). Reading a config file is not enough to know what will run; this
resolves exactly as the stage does, through the same `configure` functions, and writes nothing.

`sdd <stage> --help-config` lists what a stage accepts before anything resolves: every field of its
sdd options and of its TRL config, with type, default and help (each field's own `metadata["help"]`).
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

from sdd import config as cfg
from sdd.stages import common

TRAINING_STAGES = ("sft", "teacher-rl", "student-rl", "warmup", "distill")


def _configure(stage: str, args: common.StageArgs):
    """(stage name, sdd options, TRL config or None) from the stage module's own configure."""
    if stage == "sft":
        from sdd.stages import sft

        return sft.configure(args)
    if stage in ("teacher-rl", "student-rl"):
        from sdd.stages import rl

        return rl.configure(args, stage)
    if stage == "warmup":
        from sdd.stages import warmup

        return warmup.configure(args)
    if stage == "distill":
        from sdd.stages import distill

        return distill.configure(args)
    if stage == "eval":
        from sdd.stages.eval import EvalOptions

        options, _ = common.resolve_options(("eval",), EvalOptions, None, args, {})
        return args.name or "eval", options, None
    raise ValueError(f"no configuration to resolve for stage {stage!r}")


def layers_used(stage: str, name: str, args: common.StageArgs) -> list[str]:
    """The layers that supplied values, lowest first, as `common.resolve_options` stacks them."""
    used = ["sdd defaults"]
    run_config = Path(args.run) / cfg.RUN_CONFIG_NAME
    sections = (stage,) if stage == "eval" else (stage, name)
    if run_config.is_file():
        for section in dict.fromkeys(sections):
            if cfg.run_defaults(Path(args.run), section):
                used.append(f"{run_config} [{section}]")
    else:
        used.append(f"(no {run_config} yet: the run dir's own defaults, if it will have any, are not included)")
    if args.recipe:
        used.append("the recipe")
    if args.config_file:
        used.append(args.config_file)
    if any(v is not None for v in args.cli.values()):
        used.append("the command line")
    if args.sets:
        used.append("--set")
    return used


def _non_default(trl_config) -> dict:
    """TRL fields whose resolved value differs from the TRL class's own default (device settings aside).

    Compared through `to_dict()` on both sides, so TRL's own rewriting of fields (masked tokens,
    expanded accelerator config) does not show up as a change.
    """
    values = cfg.to_jsonable(trl_config.to_dict())
    device = {"output_dir": trl_config.output_dir, "bf16": trl_config.bf16, "use_cpu": trl_config.use_cpu}
    defaults = cfg.to_jsonable(type(trl_config)(**device).to_dict())
    changed = {k: v for k, v in values.items() if defaults.get(k, dataclasses.MISSING) != v}
    return {**{k: v for k, v in device.items() if k != "output_dir"}, **changed}


def resolve(stage: str, args: common.StageArgs) -> dict:
    """{"stage", "name", "layers", "sdd", "trl", "trl_changed"}: what the stage would run with."""
    name, options, trl_config = _configure(stage, args)
    resolved = {"stage": stage, "name": name, "layers": layers_used(stage, name, args),
                "sdd": cfg.to_jsonable(options)}
    if trl_config is not None:
        resolved["trl_class"] = type(trl_config).__name__
        resolved["trl_changed"] = _non_default(trl_config)
        resolved["trl"] = cfg.to_jsonable(trl_config.to_dict())
    return resolved


def show(stage: str, args: common.StageArgs, as_json: bool = False) -> dict:
    """Print the resolved configuration (YAML, or JSON) and return it; nothing is written anywhere."""
    resolved = resolve(stage, args)
    if as_json:
        print(json.dumps(resolved, indent=2, sort_keys=False))
    else:
        import yaml

        print(yaml.safe_dump(resolved, sort_keys=False, width=120), end="")
    return resolved


def config_classes(stage: str) -> tuple[type, type | None, dict]:
    """(sdd options class, TRL config class or None, the stage's defaults for TRL fields) of a stage command."""
    if stage == "eval":
        from sdd.stages.eval import EvalOptions

        return EvalOptions, None, {}
    from trl import DistillationConfig, GRPOConfig, SFTConfig

    from sdd.stages import distill, rl, sft, warmup

    options_cls, trl_cls, defaults = {
        "sft": (sft.SftOptions, SFTConfig, sft.DEFAULTS),
        "teacher-rl": (rl.RlOptions, GRPOConfig, rl.DEFAULTS),
        "student-rl": (rl.RlOptions, GRPOConfig, rl.DEFAULTS),
        "warmup": (warmup.WarmupOptions, SFTConfig, warmup.DEFAULTS),
        "distill": (distill.DistillOptions, DistillationConfig, distill.DEFAULTS),
    }[stage]
    return options_cls, trl_cls, {**common.device_defaults(), **defaults}


def accepted_fields(stage: str, flags: dict[str, str] | None = None) -> dict:
    """Every option the stage accepts, sdd's then its TRL config's: `sdd <stage> --help-config --json`.

    `flags` names the command-line flag of the options that have one.
    """
    options_cls, trl_cls, trl_defaults = config_classes(stage)
    flags = flags or {}
    groups = [{"owner": "sdd", "class": options_cls.__name__, "fields": cfg.describe_fields(options_cls)}]
    if trl_cls is not None:
        groups.append({"owner": "trl", "class": trl_cls.__name__,
                       "fields": cfg.describe_fields(trl_cls, trl_defaults)})
    for group in groups:
        for field in group["fields"]:
            if field["name"] in flags:
                field["flag"] = flags[field["name"]]
    return {"stage": stage, "groups": groups}


def show_fields(stage: str, flags: dict[str, str] | None = None, as_json: bool = False) -> dict:
    """Print every option the stage accepts (text, or JSON) and return them; nothing else happens."""
    accepted = accepted_fields(stage, flags)
    if as_json:
        print(json.dumps(accepted, indent=2))
        return accepted
    print(f"sdd {stage} accepts these options, set in a --config file, the run dir's config.yaml [{stage}], a recipe,\n"
          "a flag where there is one, or --set key=value. Defaults are the stage's own, before any of those;\n"
          "--print-config shows what a run resolves them to.")
    for group in accepted["groups"]:
        title = f"sdd's options ({group['class']})" if group["owner"] == "sdd" else f"TRL's {group['class']}"
        print(f"\n{title}")
        for field in group["fields"]:
            default = json.dumps(field["default"])
            if "class_default" in field:
                default += f", TRL's {json.dumps(field['class_default'])}"
            flag = f"  {field['flag']}" if "flag" in field else ""
            print(f"  {field['name']}{flag}  ({field['type']}, default {default})")
            if field["help"]:
                print(textwrap.fill(field["help"], width=110, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return accepted
