"""Triton launchers of the relation family: one module per op; shared tiles and helpers in _rows."""
