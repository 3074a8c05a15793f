"""What a post-training stage changed, measured from two checkpoints and their samples.

The research sdd is built on makes claims a user should be able to check on their own runs: RL
updates a sparse slice of the parameters (5-30%), the same slice across seeds; RL raises pass@1
while the set of problems solved at large k shrinks; RL collapses the variety of answers and formats;
distillation copies a whole distribution. The rooms:

    weights.py      update sparsity, effective rank, overlap across seeds (pure, over checkpoint dirs)
    completions.py  capability boundary and diversity (pure, over verified samples)
    pairs.py        which checkpoints to compare, found through the manifests; the seed overlaps
    sampling.py     how analysis samples (eval's settings), the problems, and the sample cache
    measures.py     the registry: each measure's compute, headline, report table and plot, in one place
    report.py       the `sdd report` section: the pairs table, each measure's table, one figure per pair
    text.py         how numbers and paths read in console lines and tables
    tokens.py       the per-token KL to the teacher and its top alternatives, for `sdd inspect`
    inspect_page.py the one self-contained HTML page `sdd inspect` writes

Teacher agreement's KL is `sdd/agreement.py`, a leaf module, because warmup and distill report it
too. `sdd analyze` (sdd/stages/analyze.py) runs them; docs/analyze.md defines every number. The pure
measures are re-exported here (`from sdd import analysis; analysis.compare_weights(...)`); importing
this package loads neither transformers nor the generation stack.
"""

from sdd.analysis.completions import (
    capability,
    distinct_answer_rate,
    distinct_n,
    diversity,
    entropy_bits,
    format_signature,
    length_bucket,
    normalized_answer,
    pass_at_k_curve,
)
from sdd.analysis.weights import (
    CHUNK_ELEMENTS,
    LAYER_TYPES,
    RANK_MATRICES,
    SPARSITY_RULE,
    CheckpointReader,
    changed_masks,
    coarser_dtype,
    compare_weights,
    effective_rank,
    half_ulp,
    layer_index,
    layer_type,
    overlap_weights,
    read_header,
)

__all__ = [
    "CHUNK_ELEMENTS", "LAYER_TYPES", "RANK_MATRICES", "SPARSITY_RULE", "CheckpointReader", "capability",
    "changed_masks", "coarser_dtype", "compare_weights", "distinct_answer_rate", "distinct_n", "diversity",
    "effective_rank", "entropy_bits", "format_signature", "half_ulp", "layer_index", "layer_type", "length_bucket",
    "normalized_answer", "overlap_weights", "pass_at_k_curve", "read_header",
]
