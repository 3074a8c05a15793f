"""Loading models and tokenizers safely, and the teacher/student pre-flight check.

Loading goes through the same `from_pretrained` calls for hub ids and local paths, with the
safe defaults a shared cluster needs: no remote code unless asked, weights only from
safetensors (no pickle). Every failure a user can fix becomes one line naming the model.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, NamedTuple

from sdd.errors import SddError

PROBE_CONVERSATION = [
    {"role": "user", "content": "What is 1+1? Let's think step by step and output the final answer within \\boxed{}."},
    {"role": "assistant", "content": "1+1=2. The answer is \\boxed{2}."},
]


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") != 1


def check_reference(name: str, *, trust_remote_code: bool = False, revision: str | None = None) -> None:
    """Fail early, before any heavy import, download or manifest record, on a local model sdd must not load.

    Checked here from config.json and the file names alone: a path that is not there, a model that is
    not a causal LM, one that needs its own Python code (unless trusted), and weights that exist only
    as pickle (`pytorch_model.bin`), which sdd never loads because unpickling can run arbitrary code.
    Hub ids are checked by `from_pretrained` itself (use_safetensors=True refuses pickle there too).
    """
    path = Path(name).expanduser()
    if _looks_local(name) and not path.exists():
        raise SddError(f"model {name} does not exist (neither a local directory nor an owner/name hub id)")
    if not path.is_dir():
        return
    if revision:  # from_pretrained ignores a revision for a folder: the model would not be the one asked for
        raise SddError(f"a revision ({revision}) selects files of a hub model, but {name} is a local folder; "
                       "drop model_revision, or name the hub id")
    config_file = path / "config.json"
    if not config_file.is_file():
        if (path / "adapter_config.json").is_file():
            raise SddError(f"model {name} holds a LoRA adapter only (adapter_config.json, no config.json): it was "
                           "saved with adapter_only; rerun that stage without adapter_only for merged weights, or "
                           "merge it with peft (merge_and_unload) into a folder of its own")
        raise SddError(f"model {name} has no config.json; point at a saved model directory (e.g. <stage>/final)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SddError(f"model {name}: config.json is unreadable ({_first_line(err)}); restore the checkpoint") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    auto_map = (config.get("auto_map") or {}) if isinstance(config, dict) else {}
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        if auto_map and not trust_remote_code:
            raise SddError(f"model {name} (model_type {model_type!r}) needs its own Python code to load; read it, "
                           "then pass --set trust_remote_code=true if you trust it")
        if not auto_map:
            raise SddError(f"model {name} has model_type {model_type!r}, which transformers does not know; "
                           "fix its config.json or upgrade transformers")
    elif model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not (trust_remote_code and "AutoModelForCausalLM" in auto_map):
        raise SddError(f"{name} is not a causal language model (model_type '{model_type}'); sdd trains "
                       "decoder-only LMs that load with AutoModelForCausalLM")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in path.glob(pattern))
        if pickled:
            raise SddError(f"model {name} has only pickled weights ({pickled[0]}); sdd loads safetensors only - "
                           "convert it once where you trust the file (from_pretrained, then save_pretrained)")
        raise SddError(f"model {name} has no *.safetensors weights; point at a saved model directory")
    for weights in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise SddError(f"model {name}: {weights} is cut short or corrupt ({problem}); restore it, or rerun the "
                           "stage that wrote it")


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not whole, e.g. "model.safetensors 1234 of 5678 bytes"; None when it is.

    A safetensors file is an 8-byte header length, a JSON header giving every tensor's byte range, then the
    bytes: so its full size is known from its first bytes, and a file cut short (a copy or a write that did
    not finish, a node lost under a network filesystem) shows without reading the tensors.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else None
            if length is None or size < 8 + length:
                return f"{path.name} {size} bytes, cut inside its header"
            header = json.loads(handle.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        return f"{path.name} has no readable header: {_first_line(err)}"
    expected = 8 + length + end
    return f"{path.name} {size} of {expected} bytes" if size < expected else None


def load_tokenizer(name: str, *, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    check_reference(name, trust_remote_code=trust_remote_code, revision=revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as err:  # noqa: BLE001 - transformers raises OSError/ValueError/... with long texts
        raise SddError(f"could not load the tokenizer of {name}: {_first_line(err)}{_remote_code_hint(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(name: str, *, dtype: str = "float32", trust_remote_code: bool = False, device: str | None = None,
                   revision: str | None = None):
    """A causal LM from a hub id or a local directory, refusing pickled weights.

    The default, float32, is for the model a stage trains: its weights are the optimizer's master copy,
    and bf16 weights (what `dtype="auto"` gives for a bf16 checkpoint) cannot take lr 1e-6 updates
    (FINDINGS: 2% of weights moved against 46% in fp32). Compute still runs in bf16 where the device has
    it (TRL's `bf16=True` autocast, DeepSpeed's bf16 mode, FSDP's mixed precision). Frozen models (teachers,
    eval) pass `dtype="auto"` and stay in their checkpoint's dtype."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    check_reference(name, trust_remote_code=trust_remote_code, revision=revision)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as err:  # noqa: BLE001
        raise SddError(f"could not load model {name}: {_first_line(err)}{_remote_code_hint(err)}") from None
    torch_dtype = dtype if dtype == "auto" else getattr(torch, str(dtype), None)
    if not isinstance(torch_dtype, (str, torch.dtype)):
        raise SddError(f"dtype {dtype!r} is not a torch dtype; use auto, float32, bfloat16 or float16")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True, revision=revision
        )
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise SddError(f"{name} is not a causal language model (model_type '{config.model_type}')") from None
        raise SddError(f"could not load model {name}: {_first_line(err)}") from None
    except OSError as err:
        raise SddError(f"could not load model {name}: {_first_line(err)} (sdd loads safetensors weights only)") from None
    if device:
        model.to(device)
    return model


def _remote_code_hint(err: BaseException) -> str:
    if "custom code" in str(err) or "trust_remote_code" in str(err):
        return " (read that code, then pass --set trust_remote_code=true if you trust it)"
    return ""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def shared_vocab_size(teacher_tokenizer, student_tokenizer, teacher_config, student_config) -> int:
    """Pre-flight check before any teacher forward; returns the vocabulary both heads are sliced to.

    Token-level KL compares distributions index by index, so it is meaningless unless both
    models index the same tokens: same vocabulary, same special tokens, same chat rendering.
    lm_head rows beyond the tokenizer are padding (Qwen pads 151,669 tokens to 151,936 or
    152,064 rows), so heads of different sizes are fine as long as both cover the tokenizer:
    both are sliced to the tokenizer's tokens, which is what the returned size is.
    """
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
        only_t = len(set(t_vocab) - set(s_vocab))
        only_s = len(set(s_vocab) - set(t_vocab))
        moved = sum(1 for tok, i in t_vocab.items() if tok in s_vocab and s_vocab[tok] != i)
        raise SddError(
            f"teacher and student tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens: {only_t} only in the "
            f"teacher, {only_s} only in the student, {moved} with other ids); token-level KL needs one tokenizer"
        )
    for attr in ("eos_token", "pad_token", "bos_token"):
        t_value, s_value = getattr(teacher_tokenizer, attr), getattr(student_tokenizer, attr)
        if t_value != s_value:
            raise SddError(f"teacher and student tokenizers differ in {attr}: {t_value!r} vs {s_value!r}")
    try:
        t_render = teacher_tokenizer.apply_chat_template(PROBE_CONVERSATION, tokenize=False)
        s_render = student_tokenizer.apply_chat_template(PROBE_CONVERSATION, tokenize=False)
    except Exception as err:  # noqa: BLE001 - a missing template raises ValueError, a broken one Jinja errors
        raise SddError(f"cannot render the chat template of the teacher or student tokenizer: {_first_line(err)}") from None
    if t_render != s_render:
        raise SddError("teacher and student chat templates render the same conversation differently; use one tokenizer")
    tokens = len(teacher_tokenizer)
    t_rows, s_rows = teacher_config.vocab_size, student_config.vocab_size
    if min(t_rows, s_rows) < tokens:
        raise SddError(
            f"lm_head sizes do not cover the tokenizer: teacher {t_rows}, student {s_rows} rows for {tokens} tokens"
        )
    return tokens


class TokenizerPair(NamedTuple):
    teacher: Any
    student: Any
    vocab_size: int  # the rows both heads are sliced to (shared_vocab_size)


def load_pair(teacher: str, student: str, *, trust_remote_code: bool = False, teacher_revision: str | None = None,
              student_revision: str | None = None) -> TokenizerPair:
    """Both tokenizers of a teacher/student pair and the vocabulary their heads share, checked before any weights load.

    warmup and distill compare the two models token by token, so both start here: a pair that does not
    share a tokenizer fails in seconds with one line, not after the teacher has sampled for an hour.
    """
    from transformers import AutoConfig

    teacher_tokenizer = load_tokenizer(teacher, trust_remote_code=trust_remote_code, revision=teacher_revision)
    student_tokenizer = load_tokenizer(student, trust_remote_code=trust_remote_code, revision=student_revision)
    vocab_size = shared_vocab_size(
        teacher_tokenizer, student_tokenizer,
        AutoConfig.from_pretrained(teacher, trust_remote_code=trust_remote_code, revision=teacher_revision),
        AutoConfig.from_pretrained(student, trust_remote_code=trust_remote_code, revision=student_revision),
    )
    return TokenizerPair(teacher_tokenizer, student_tokenizer, vocab_size)


# -- engines: what a loss may read from a model that DeepSpeed ZeRO-3 or FSDP2 holds in shards ------


def is_zero3_partitioned(tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter: outside its module's forward its local tensor is a 0-element shard."""
    return hasattr(tensor, "ds_id")


def is_dtensor(tensor) -> bool:
    """An FSDP2 (fully_shard) parameter: a DTensor whose local tensor is this rank's shard."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)


@contextlib.contextmanager
def head_for_loss(model, *, trainable: bool):
    """The lm_head weight as a whole (V, H) tensor a chunked loss can project with, under any engine.

    The losses read `lm_head.weight` themselves (that is what lets them avoid the N x V logits), so
    they see what the engine keeps between forwards: under ZeRO-3 a 0-element shard, under FSDP2 a
    DTensor shard. This is the one place that turns either into the full matrix:

    - FSDP2: `full_tensor()`, an all-gather with autograd, so the gradient flows back into the shards.
    - ZeRO-3, frozen (the teacher; no gradient): gathered for the body of the `with` and re-partitioned
      after it (`GatheredParameters`, modifier_rank None: nothing written back).
    - ZeRO-3, trainable (the student): the gradient is computed in the trainer's backward, after this
      block, and needs the full weight again then. So the head is registered as an external parameter
      of the top-level module (once): DeepSpeed then gathers it with that module's own parameters at
      its forward (the loss runs inside it, through TRL's forward redirection) and again at its
      backward, and reduce-scatters its gradient into the real Parameter's shard like any other.
    - anything else (one process, DDP): the Parameter itself.

    Must be entered on every rank at the same point: each gather is a collective.
    """
    weight = model.get_output_embeddings().weight
    if is_dtensor(weight):
        yield weight.full_tensor()
    elif is_zero3_partitioned(weight) and not trainable:
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            # a copy: the loss keeps it for its backward, after this block has re-partitioned the weight
            yield weight.detach().clone()
    elif is_zero3_partitioned(weight):
        if getattr(weight, "_sdd_external_of", None) != id(model):
            import deepspeed

            deepspeed.zero.register_external_parameter(model, weight)
            weight._sdd_external_of = id(model)
        if weight.numel() == 0:  # called outside the engine's forward: the registration cannot help
            raise RuntimeError("the ZeRO-3 student's lm_head is not gathered: call the loss through the engine's "
                               "forward (TRL's _ForwardRedirection)")
        yield weight
    else:
        yield weight


_IN_USE = "sdd.models.whole_models"  # a user of ZeRO-3 parameters besides the engine's own submodules


@contextlib.contextmanager
def whole_models(*models):
    """Every parameter of `models` whole for the body of the `with`, for a forward (and direct reads of the
    head) outside the training engine, e.g. warmup's held-out KL: ZeRO-3 partitions gathered, FSDP2 modules
    unsharded then resharded; a no-op for plain models. Nothing written inside is kept. All ranks must
    enter it together (each gather is a collective)."""
    params = [p for model in models for p in model.parameters() if is_zero3_partitioned(p)]
    fsdp_modules = []
    try:
        from torch.distributed.fsdp import FSDPModule

        fsdp_modules = [m for model in models for m in model.modules() if isinstance(m, FSDPModule)]
    except ImportError:
        pass
    with contextlib.ExitStack() as stack:
        if params:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(params, modifier_rank=None))
            # After training the engine's module hooks re-partition a submodule's parameters when its forward
            # ends, gathered or not (the tied head with the embedding, before the loss reads it). They release
            # a parameter only when no module is using it: this context counts as one until it exits, and
            # is removed before the gather's own exit partitions them.
            for p in params:
                p.ds_active_sub_modules.add(_IN_USE)
            stack.callback(lambda: [p.ds_active_sub_modules.discard(_IN_USE) for p in params])
        for module in fsdp_modules:
            module.unshard()
            stack.callback(module.reshard)
        yield
