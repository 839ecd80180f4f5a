"""Distillation across devices on torch.distributed (issue 13; docs/design.md §2.5).

Any torch.distributed backend (gloo on CPU, NCCL on GPUs); no communication of its own. Nothing
else in kdkernels imports this package.

* ``vocab_parallel_softmax_kl_div``: softmax-KL of logits whose vocabulary is sharded over the ranks
  (tensor-parallel LM heads); only O(rows) statistics are communicated, never logits.
* ``vocab_parallel_fused_linear_softmax_kl_div``: the same for a vocabulary-sharded LM head (each
  rank holds its rows of the weight) fused with the loss: no rank materialises its logits slice.
* ``global_rkd_distance``, ``global_rkd_angle``, ``global_rkd``, ``global_similarity_preserving``:
  the relation losses of the global batch when each rank holds its own rows (data parallel, uneven
  counts and empty ranks allowed); the embeddings are all-gathered (never a B x B matrix) and every
  rank runs the fused op on the whole batch; each rank's gradient is its rows' slice.
"""
from kdkernels.distributed.global_batch import (
    global_rkd,
    global_rkd_angle,
    global_rkd_distance,
    global_similarity_preserving,
)
from kdkernels.distributed.vocab_parallel import vocab_parallel_softmax_kl_div
from kdkernels.distributed.vocab_parallel_linear import vocab_parallel_fused_linear_softmax_kl_div

__all__ = ["vocab_parallel_softmax_kl_div", "vocab_parallel_fused_linear_softmax_kl_div", "global_rkd_distance",
           "global_rkd_angle", "global_rkd", "global_similarity_preserving"]
