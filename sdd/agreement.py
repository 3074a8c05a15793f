"""Moved to sdd/analysis/agreement.py; this name stays until warmup.py imports it from there."""

from sdd.analysis.agreement import Sequence, last_hidden_states, mean_divergence, pack

__all__ = ["Sequence", "last_hidden_states", "mean_divergence", "pack"]
