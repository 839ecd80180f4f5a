"""Distillation across devices on torch.distributed (issue 13; docs/design.md §2.5).

Any torch.distributed backend (gloo on CPU, NCCL on GPUs); no communication of its own. Nothing
else in kdkernels imports this package.

* ``vocab_parallel_softmax_kl_div``: softmax-KL of logits whose vocabulary is sharded over the ranks
  (tensor-parallel LM heads); only O(rows) statistics are communicated, never logits.
* ``vocab_parallel_fused_linear_softmax_kl_div``: the same for a vocabulary-sharded LM head (each
  rank holds its rows of the weight) fused with the loss: no rank materialises its logits slice.
"""
from kdkernels.distributed.vocab_parallel import vocab_parallel_softmax_kl_div
from kdkernels.distributed.vocab_parallel_linear import vocab_parallel_fused_linear_softmax_kl_div

__all__ = ["vocab_parallel_softmax_kl_div", "vocab_parallel_fused_linear_softmax_kl_div"]
