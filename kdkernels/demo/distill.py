"""The distillation objective: response KD + feature hint + relation loss, on one backend.

backend "eager" runs the same three losses as users write them in plain PyTorch (the bench's
baselines, kdkernels/bench/baselines.py): what the demo times kdkernels against. The hint's 1x1
projection is the ProjectedMSELoss's parameters on every backend, so both runs train the same model."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor, nn

import kdkernels
from kdkernels.bench import baselines


@dataclass
class Weights:
    kd: float = 1.0          # SoftmaxKLDivLoss (T^2-scaled), on top of cross-entropy (weight 1)
    temperature: float = 4.0
    hint: float = 1.0        # ProjectedMSELoss on the 4x4 feature maps
    relation: float = 1.0    # RKDLoss (distance + 2 x angle) on the penultimate embeddings

    def as_dict(self) -> dict:
        return asdict(self)


class DistillLoss(nn.Module):
    """Weighted sum of the three kdkernels losses; owns the hint's 1x1 projection (train it too)."""

    def __init__(self, student_channels: int, teacher_channels: int, weights: Weights,
                 backend: str = "auto") -> None:
        super().__init__()
        self.weights = weights
        self.eager = backend == "eager"
        backend = "torch" if self.eager else backend  # the modules' own backend is unused when eager
        self.kd = kdkernels.SoftmaxKLDivLoss(temperature=weights.temperature, backend=backend)
        # (N, Cs, H, W) -> (N, Ct, H, W): a 1x1 convolution per pixel, no permute needed
        self.hint = kdkernels.ProjectedMSELoss(student_channels, teacher_channels, feature_dim=1, backend=backend)
        self.relation = kdkernels.RKDLoss(distance_weight=1.0, angle_weight=2.0, backend=backend)

    def forward(self, student_out: tuple[Tensor, Tensor, Tensor], teacher_out: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        (s_logits, s_map, s_emb), (t_logits, t_map, t_emb) = student_out, teacher_out
        w = self.weights
        if self.eager:
            return (w.kd * baselines.softmax_kl_div(s_logits, t_logits, temperature=w.temperature)
                    + w.hint * baselines.projected_mse(s_map, t_map, self.hint.weight, self.hint.bias, feature_dim=1)
                    + w.relation * baselines.rkd(s_emb, t_emb, distance_weight=1.0, angle_weight=2.0))
        return (w.kd * self.kd(s_logits, t_logits) + w.hint * self.hint(s_map, t_map)
                + w.relation * self.relation(s_emb, t_emb))
