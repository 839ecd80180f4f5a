"""Triton launchers of the response family: one module per op (softmax_kl); shared helpers in _rows."""
