"""Temporary alias; use kdkernels._dtypes."""
from kdkernels._dtypes import opmath_dtype  # noqa: F401
