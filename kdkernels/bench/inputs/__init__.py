"""Random inputs of every loss family, one maker per family, shared by the test suite and the bench.

A maker takes a random source (``source``: how values are drawn, see there) and the family's
sizes and options, and returns the loss's tensor arguments:

* ``response``  ``softmax_kl_inputs``    student / teacher logits, labels
* ``feature``   ``projected_mse_inputs`` student / teacher features, weight, bias;
  ``attention_transfer_inputs`` student / teacher feature maps
* ``relation``  ``relation_inputs``      student / teacher embeddings or feature maps;
  ``fsp_inputs`` the student's and the teacher's pair of feature maps
"""
from kdkernels.bench.inputs.feature import attention_transfer_inputs, projected_mse_inputs
from kdkernels.bench.inputs.relation import fsp_inputs, relation_inputs
from kdkernels.bench.inputs.response import softmax_kl_inputs
from kdkernels.bench.inputs.source import DeviceSource, Float64Source

__all__ = ["DeviceSource", "Float64Source", "attention_transfer_inputs", "fsp_inputs", "projected_mse_inputs", "relation_inputs", "softmax_kl_inputs"]
