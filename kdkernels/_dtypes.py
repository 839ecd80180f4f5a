"""The op-math dtype rule shared by all references and backends: float32, or float64 for float64."""
import torch


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
