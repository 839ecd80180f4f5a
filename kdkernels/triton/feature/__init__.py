"""Triton launchers of the feature family: one module per op (projected_mse, attention_transfer)."""
