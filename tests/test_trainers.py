"""The trainer classes of sdd.train: importable by name, and still attached to the TRL/transformers internals
they override.

sdd's trainers override some private methods of TRL's and transformers' trainers (the guard's checks, the
distillation loss), because those libraries offer no public hook for them. A release that renames such a
method, changes its parameters or stops calling it would leave sdd's override silently unused: the run
would train with TRL's loss, or without the non-finite guard. These tests make that upgrade fail here.
"""

from __future__ import annotations

import inspect

import pytest

# Private methods sdd's classes add for their own use: they must not collide with one of the base's.
OWN_HELPERS = {"_kl", "_log_mean"}


def _sdd_classes():
    from sdd.train import ForwardKLTrainer, GuardedGRPOTrainer, GuardedSFTTrainer, OnPolicyDistiller

    return [GuardedSFTTrainer, GuardedGRPOTrainer, ForwardKLTrainer, OnPolicyDistiller]


def _library_base(cls):
    """The first class in the MRO that is not sdd's: the TRL trainer the sdd class extends."""
    return next(c for c in cls.__mro__ if not c.__module__.startswith("sdd."))


def _methods_sdd_defines(cls) -> dict:
    out = {}
    for klass in cls.__mro__:
        if not klass.__module__.startswith("sdd."):
            break
        for name, value in vars(klass).items():
            if callable(value) and not (name.startswith("__") and name.endswith("__")):
                out.setdefault(name, value)
    return out


def test_trainer_classes_import_from_sdd_train_with_the_guard_first():
    from trl import DistillationTrainer, GRPOTrainer, SFTTrainer

    from sdd.train import ForwardKLTrainer, GuardedMixin, OnPolicyDistiller

    expected = dict(zip(_sdd_classes(), (SFTTrainer, GRPOTrainer, SFTTrainer, DistillationTrainer), strict=True))
    for cls, base in expected.items():
        assert _library_base(cls) is base, cls
        mro = cls.__mro__
        assert mro.index(GuardedMixin) < mro.index(base), f"{cls.__name__}: the guard must come before {base.__name__}"
    assert ForwardKLTrainer.__module__ == OnPolicyDistiller.__module__ == "sdd.train.trainers"


@pytest.mark.parametrize("cls", _sdd_classes(), ids=lambda c: c.__name__)
def test_every_overridden_method_still_exists_in_the_library_with_the_same_parameters(cls):
    base = _library_base(cls)
    for name, ours in _methods_sdd_defines(cls).items():
        if name in OWN_HELPERS:
            assert not hasattr(base, name), f"{base.__name__} now has {name}: sdd's helper of that name shadows it"
            continue
        if name == "__init__" or not hasattr(ours, "__code__"):
            continue
        assert hasattr(base, name), (f"{cls.__name__}.{name} overrides {base.__name__}.{name}, which this "
                                     f"TRL/transformers no longer has: the override would never run")
        mine = inspect.signature(ours).parameters
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in mine.values()):
            continue  # forwards whatever the library passes
        theirs = inspect.signature(getattr(base, name)).parameters
        assert list(mine) == list(theirs), f"{base.__name__}.{name}{tuple(theirs)} changed; sdd overrides it as {tuple(mine)}"


def test_on_policy_distiller_loss_is_the_one_trl_calls():
    """TRL 1.16 has no public hook for the distillation loss alone (see OnPolicyDistiller's docstring)."""
    from trl import DistillationTrainer

    from sdd.train import OnPolicyDistiller

    theirs = inspect.signature(DistillationTrainer._compute_loss)
    assert list(theirs.parameters) == ["self", "unwrapped_student", "inputs", "num_items_in_batch"], theirs
    assert list(inspect.signature(OnPolicyDistiller._compute_loss).parameters) == list(theirs.parameters)
    assert "self._compute_loss" in inspect.getsource(DistillationTrainer.compute_loss), \
        "DistillationTrainer.compute_loss no longer calls self._compute_loss: sdd's loss would not run"
    hidden = list(inspect.signature(DistillationTrainer._get_last_hidden_state).parameters)
    assert hidden[:5] == ["self", "unwrapped_model", "input_ids", "attention_mask", "logits_to_keep"], hidden
