"""The vLLM and transformers backends are one option away, and the option reaches TRL untouched."""

import pytest

from sdd.stages.common import StageArgs


@pytest.mark.parametrize("stage", ["teacher-rl", "student-rl", "distill"])
def test_backend_vllm_reaches_trl_config(tmp_path, stage):
    from sdd.stages import distill, rl

    args = StageArgs(run=str(tmp_path), sets=["backend=vllm", "vllm_gpu_memory_utilization=0.45",
                                              "vllm_tensor_parallel_size=2", "max_completion_length=8192"])
    _, options, config = distill.configure(args) if stage == "distill" else rl.configure(args, stage)
    assert options.backend == "vllm"
    assert config.use_vllm is True and config.vllm_mode == "colocate"
    assert config.vllm_gpu_memory_utilization == 0.45 and config.vllm_tensor_parallel_size == 2
    assert config.max_completion_length == 8192


def test_trl_vllm_fields_win_over_backend(tmp_path):
    """`--set use_vllm=true --set vllm_mode=server` is TRL's own switch, and passes straight through."""
    from sdd.stages import rl

    args = StageArgs(run=str(tmp_path), sets=["use_vllm=true", "vllm_mode=server", "vllm_server_port=8123"])
    _, options, config = rl.configure(args, "teacher-rl")
    assert options.backend == "hf"
    assert config.use_vllm is True and config.vllm_mode == "server" and config.vllm_server_port == 8123


def test_paper_defaults_and_thinking_off(tmp_path):
    from sdd.stages import rl

    _, _, config = rl.configure(StageArgs(run=str(tmp_path)), "teacher-rl")
    assert (config.loss_type, config.epsilon, config.epsilon_high, config.beta) == ("dapo", 0.2, 0.28, 0.0)
    assert (config.num_generations, config.temperature, config.learning_rate) == (8, 1.0, 1e-6)
    assert (config.weight_decay, config.max_grad_norm) == (0.1, 1.0)
    assert config.chat_template_kwargs == {"enable_thinking": False}


def test_eval_backend_vllm_without_vllm_is_one_line(toy_run):
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    result = subprocess.run([sys.executable, "-m", "sdd", "eval", "--run", str(toy_run), "--role", "teacher",
                             "--backend", "vllm", "--limit", "2", "--samples", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "pip install vllm" in result.stderr and len(result.stderr.strip().splitlines()) == 1
