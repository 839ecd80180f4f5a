"""Test-wide set-up: Triton's interpreter on machines without a GPU, hypothesis profiles, devices."""
import os

import torch

# Must happen before anything imports triton: without a GPU, Triton kernels run on CPU tensors
# in the interpreter (docs/design.md §4). With a GPU the real compiler is used.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# ci (make test): the same examples on every run, so a red CI is a reproducible failure, not a draw;
# soak (make soak): random and 16x as many, to look for new counter-examples (then pin them with @example)
settings.register_profile(
    "ci", max_examples=25, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "soak", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
