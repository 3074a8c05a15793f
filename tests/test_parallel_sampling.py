"""Data-parallel sampling: warmup's teacher samples and the GRPO gate split across ranks, each rank on its
own device, and the result is what one process produces.

The sampler is counter-based (sdd/generation.py): a prompt's random numbers depend on its chunk's seed
and its index in the chunk, not on which rank draws it or what else shares its batch. So rank r of P
sampling positions r, r + P, ... of every chunk, merged back in prompt order, must give the one-process
file byte for byte. The fast tests run the ranks' file protocol as threads (no process group is needed
without a sample cache); the slow ones run 2 real processes under `accelerate launch`, with DDP and
with DeepSpeed ZeRO-3 (which partitions the teacher at load time: the script asserts it did).
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import threading
import weakref
from pathlib import Path

import pytest
from test_multiprocess import ENV, LAUNCH

from sdd.errors import SddError

ZERO3_LAUNCH = [LAUNCH[0], "launch", "--config_file", str(Path(__file__).parent / "accelerate" / "zero3.yaml")]
PROMPTS = 12  # chunks of 5: 5 + 5 + 2, so the two ranks' shares are uneven (3/2, 3/2, 1/1)


def _gate_options():
    from sdd.stages.rl import RlOptions

    return RlOptions(gate=True, gate_samples=4, gate_temperature=1.0)


GATE = _gate_options()


class StopAfter:
    """A PreemptionFlag stand-in whose signal "arrives" after `checks` reads of `requested`."""

    def __init__(self, checks: int):
        self.checks = checks

    @property
    def requested(self):
        self.checks -= 1
        return "SIGTERM" if self.checks < 0 else None


class NoSignal:
    requested = None


def sampling_inputs(run: Path):
    """(teacher path, records, WarmupOptions, provenance) for a small sampling pass over the run's train set."""
    from sdd import data
    from sdd.manifest import RunDir
    from sdd.stages.warmup import WarmupOptions

    records = data.load(data.resolve("toy-train", registered=RunDir(run).datasets()), limit=PROMPTS)
    options = WarmupOptions(samples_per_prompt=2, max_new_tokens=24, sample_chunk=5, sample_temperature=1.0)
    provenance = {"test": "parallel-sampling", "data": data.problems_fingerprint(records)}
    return str(run / "sft-teacher" / "final"), records, options, provenance


def gate_rows(run: Path, tokenizer) -> list[dict]:
    from sdd import data
    from sdd.manifest import RunDir

    records = data.load(data.resolve("toy-test", registered=RunDir(run).datasets()), limit=24)
    return [{"id": r["id"], "prompt": data.render_prompt(tokenizer, r["problem"]), "answer": r["answer"]}
            for r in records]


def reference(run: Path, out: Path) -> dict:
    """One process: the sample file's bytes and the gate's kept ids."""
    from sdd.generation import Ranks
    from sdd.models import load_causal_lm, load_tokenizer
    from sdd.stages import rl, warmup

    teacher_path, records, options, provenance = sampling_inputs(run)
    model, tokenizer = load_causal_lm(teacher_path), load_tokenizer(teacher_path)
    out.mkdir(parents=True, exist_ok=True)
    warmup.teacher_samples(model, tokenizer, records, options, out / "samples.jsonl", provenance, NoSignal(), Ranks())
    student = load_causal_lm(str(run / "sft-student" / "final"))  # the teacher is too weak to pass the gate
    rl.apply_gate(student, tokenizer, gate_rows(run, tokenizer), GATE, 48, out / "gate.json", ranks=Ranks())
    return {"samples": (out / "samples.jsonl").read_bytes(), "gate": json.loads((out / "gate.json").read_text())}


@pytest.fixture(scope="module")
def one_process(bootstrapped, tmp_path_factory) -> dict:
    return reference(bootstrapped, tmp_path_factory.mktemp("one-process"))


def test_two_ranks_sample_their_shares_and_merge_to_the_one_process_file(bootstrapped, one_process, tmp_path):
    """Rank 1 is stopped after its first chunk, its shard file gets a torn line (a kill mid-write), and it
    resumes; rank 0 merges. The merged file is the one-process file byte for byte, each rank sampled only its
    positions, and no shard file is left behind."""
    from sdd.generation import Ranks
    from sdd.models import load_causal_lm, load_tokenizer
    from sdd.stages import warmup

    teacher_path, records, options, provenance = sampling_inputs(bootstrapped)
    tokenizer = load_tokenizer(teacher_path)
    path = tmp_path / "samples.jsonl"
    shard1 = tmp_path / "samples.jsonl.shard1-of-2"
    model_1 = load_causal_lm(teacher_path)
    stopped = warmup.teacher_samples(model_1, tokenizer, records, options, path, provenance, StopAfter(1), Ranks(1, 2))
    assert stopped is None
    partial = shard1.with_name(shard1.name + ".partial")
    assert len(partial.read_text().splitlines()) == 1 + 2  # header + rank 1's 2 positions of chunk 0
    with open(partial, "a") as handle:
        handle.write('{"id": "torn", "answer": "1')

    returned: dict = {}
    rank1 = threading.Thread(target=lambda: returned.update(rank1=warmup.teacher_samples(
        model_1, tokenizer, records, options, path, provenance, NoSignal(), Ranks(1, 2))))
    rank1.start()
    for _ in range(600):  # rank 1's shard complete before rank 0 starts: it did its share alone
        if shard1.is_file():
            break
        rank1.join(timeout=0.5)
    shard_ids = [json.loads(line)["id"] for line in shard1.read_text().splitlines()[1:]]
    expected = [records[start + p]["id"] for start in range(0, PROMPTS, 5) for p in range(1, min(5, PROMPTS - start), 2)]
    assert shard_ids == expected  # positions 1, 3 of each chunk of 5: 1, 3, 6, 8, 11
    rows = warmup.teacher_samples(load_causal_lm(teacher_path), tokenizer, records, options, path, provenance,
                                  NoSignal(), Ranks(0, 2))
    rank1.join(timeout=120)
    assert not rank1.is_alive()
    assert path.read_bytes() == one_process["samples"]
    assert returned["rank1"] == rows and [r["id"] for r in rows] == [r["id"] for r in records]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.jsonl"]


def test_gate_cache_is_keyed_by_the_model(boot_run):
    """A gate.json made from one checkpoint is not reused for another (a --force rerun from a new model),
    and is reused for the same one."""
    from sdd.generation import Ranks
    from sdd.models import load_causal_lm, load_tokenizer
    from sdd.stages.rl import apply_gate

    student, teacher = boot_run / "sft-student" / "final", boot_run / "sft-teacher" / "final"
    tokenizer = load_tokenizer(str(student))
    rows = gate_rows(boot_run, tokenizer)
    path = boot_run / "gate.json"
    apply_gate(load_causal_lm(str(student)), tokenizer, rows, GATE, 48, path, ranks=Ranks())
    cached = json.loads(path.read_text())
    marker = next(r["id"] for r in rows if r["id"] not in cached["kept_ids"])
    cached["kept_ids"] = [marker]  # only a reuse of this file keeps exactly this row
    path.write_text(json.dumps(cached))
    kept, _ = apply_gate(load_causal_lm(str(student)), tokenizer, rows, GATE, 48, path, ranks=Ranks())
    assert [r["id"] for r in kept] == [marker]
    from sdd.manifest import fingerprint

    # The weak teacher passes no prompt: the gate measures, writes its verdict, and refuses to train on nothing.
    with pytest.raises(SddError, match="kept no prompts"):
        apply_gate(load_causal_lm(str(teacher)), tokenizer, rows, GATE, 48, path, ranks=Ranks())
    measured = json.loads(path.read_text())
    assert measured["key"]["model"] == fingerprint(teacher) and measured["kept_ids"] == []
    assert measured["buckets"]["never"] == len(rows)


def test_vllm_settings_are_checked_and_reach_the_engine():
    """vLLM is not installed here: the options' checks and their plumbing into `vllm.LLM` are what can be tested."""
    from sdd.generation import _VLLM_ENGINE, Ranks, SamplingParams, VllmSettings, generate, release_vllm

    for bad, word in (({"tensor_parallel_size": 0}, "tensor_parallel_size"),
                      ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
                      ({"max_model_len": 0}, "max_model_length")):
        with pytest.raises(SddError, match=word):
            VllmSettings(**bad)
    settings = VllmSettings(tensor_parallel_size=2, gpu_memory_utilization=0.5, max_model_len=4096)
    one = settings.engine_kwargs("m", 7, Ranks())
    assert one == {"model": "m", "seed": 7, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5,
                   "max_model_len": 4096}
    rank3 = settings.engine_kwargs("m", 7, Ranks(3, 4))  # the second tensor-parallel group of ranks 2, 3
    assert rank3["distributed_executor_backend"] == "external_launcher" and rank3["seed"] == 8
    assert settings.groups(Ranks(3, 4)) == (1, 2, False) and settings.groups(Ranks(2, 4)) == (1, 2, True)
    with pytest.raises(SddError, match="must divide the number of processes"):
        settings.groups(Ranks(0, 3))
    with pytest.raises(SddError, match="exceeds vllm_max_model_length"):
        settings.check_fits(4000, 200)

    class Tok:
        def __call__(self, prompts, add_special_tokens):
            return {"input_ids": [[1, 2, 3] for _ in prompts]}

    with pytest.raises(SddError, match="pip install vllm"):
        generate("some/model", Tok(), ["a"], SamplingParams(max_new_tokens=8), backend="vllm", vllm=settings)

    class Engine:  # what the cache holds between calls; release must drop the last reference to it
        pass

    engine = Engine()
    alive = weakref.ref(engine)
    _VLLM_ENGINE.update(key="k", engine=engine)
    del engine
    release_vllm()
    assert alive() is None and not _VLLM_ENGINE


def test_warmup_refuses_bad_vllm_options_in_one_line(toy_run):
    from conftest import sdd_process

    result = sdd_process("warmup", "--run", toy_run, "--set", "backend=vllm", "--set", "vllm_gpu_memory_utilization=2")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "vllm_gpu_memory_utilization must be in (0, 1]" in lines[0], result.stderr


# -- two real processes -----------------------------------------------------------------------------
SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from trl import SFTConfig
    # As in every sdd stage, the TRL config comes first: under a ZeRO-3 accelerate config it turns on
    # transformers' zero.Init, so the model below loads partitioned, as a stage's teacher does. (Only while
    # the config lives: transformers holds it by a weak reference.) The stages' device defaults matter: TRL's
    # own bf16 default would make zero.Init load the fp32 checkpoint in bf16, and sample other tokens.
    from sdd.stages.common import device_defaults
    config = SFTConfig(output_dir=sys.argv[2], report_to="none", **device_defaults())
    from test_parallel_sampling import GATE, NoSignal, StopAfter, gate_rows, sampling_inputs
    from sdd.generation import Ranks
    from sdd.models import is_zero3_partitioned, load_causal_lm, load_tokenizer
    from sdd.stages import rl, warmup
    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    ranks = Ranks.current()
    teacher_path, records, options, provenance = sampling_inputs(run)
    model, tokenizer = load_causal_lm(teacher_path), load_tokenizer(teacher_path)
    partitioned = is_zero3_partitioned(model.get_output_embeddings().weight)
    # Stopped after the first chunk (as by a SIGTERM), each rank has written its own share of it; then resumed.
    assert warmup.teacher_samples(model, tokenizer, records, options, out / "samples.jsonl", provenance,
                                  StopAfter(1), ranks) is None
    ranks.all_gather(None)  # both shares written
    if ranks.index == 0:
        shares = [len((out / f"samples.jsonl.shard{r}-of-2.partial").read_text().splitlines()) - 1 for r in (0, 1)]
        print(f"first chunk's rows per rank: {shares}", flush=True)
    rows = warmup.teacher_samples(model, tokenizer, records, options, out / "samples.jsonl", provenance,
                                  NoSignal(), ranks)
    student = load_causal_lm(str(run / "sft-student" / "final"))
    kept, _ = rl.apply_gate(student, tokenizer, gate_rows(run, tokenizer), GATE, 48, out / "gate.json", ranks=ranks)
    print(f"rank {ranks.index} of {ranks.count} on {ranks.device}: partitioned={partitioned} "
          f"rows={len(rows)} kept={len(kept)}", flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_two_processes_sample_and_gate_as_one(engine, bootstrapped, one_process, tmp_path):
    script = tmp_path / "sample.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    launcher = LAUNCH if engine == "ddp" else ZERO3_LAUNCH
    log = tmp_path / "launch.txt"
    result = subprocess.run([*launcher, str(script), str(bootstrapped), str(out), str(Path(__file__).parent)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=ENV, timeout=900)
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    for rank in (0, 1):  # ZeRO-3 really partitioned the teacher (a 0-element head outside the engine); DDP did not
        assert f"rank {rank} of 2 on cpu" in text and f"partitioned={engine == 'zero3'} rows={PROMPTS}" in text, text[-3000:]
    assert "first chunk's rows per rank: [3, 2]" in text, text[-3000:]  # positions 0, 2, 4 and 1, 3 of 5
    assert (out / "samples.jsonl").read_bytes() == one_process["samples"]
    gate = json.loads((out / "gate.json").read_text())
    assert gate["kept_ids"] == one_process["gate"]["kept_ids"] and gate["buckets"] == one_process["gate"]["buckets"]
    assert sorted(p.name for p in out.iterdir()) == ["gate.json", "samples.jsonl"]


@pytest.mark.slow
def test_warmup_stage_on_two_processes_writes_the_one_process_sample_file(bootstrapped, tmp_path):
    """The whole stage, wired as users run it: `sdd warmup` under the launcher (DDP, 2 ranks) and in one
    process write the same teacher-samples.jsonl, byte for byte, and no shard file is left."""
    import shutil

    from conftest import sdd, set_tiny
    from test_multiprocess import launch

    runs = {}
    for label in ("one", "two"):
        runs[label] = tmp_path / label / "run"
        shutil.copytree(bootstrapped, runs[label])
        set_tiny(runs[label], warmup={"max_steps": 1, "save_steps": 1, "logging_steps": 1, "sample_chunk": 5,
                                      "prompts": 16, "heldout_prompts": 4})
    sdd("warmup", "--run", runs["one"])
    out = tmp_path / "launch.txt"
    assert launch(["warmup", "--run", runs["two"]], out, in_process=True).wait(timeout=900) == 0, out.read_text()[-3000:]
    text = out.read_text()
    for rank in (0, 1):
        assert f"rank {rank}: ok  process_group_alive=False" in text, text[-3000:]
    one, two = (runs[label] / "warmup" for label in ("one", "two"))
    assert (two / "teacher-samples.jsonl").read_bytes() == (one / "teacher-samples.jsonl").read_bytes()
    assert len((one / "teacher-samples.jsonl").read_text().splitlines()) == 1 + 20
    assert not list(two.glob("teacher-samples.jsonl.*"))
