"""Teacher and student CNNs for 8x8 images; forward returns (logits, feature map, embedding).

The feature map is the last 4x4 map (N, C, 4, 4), used by the hint loss; the embedding is the
penultimate layer (N, D), used by the relation loss.
"""
from __future__ import annotations

from torch import Tensor, nn


class SmallCNN(nn.Module):
    def __init__(self, c1: int, c2: int, emb: int, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),   # 8x8
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),  # 8x8
            nn.MaxPool2d(2),                                                 # 4x4: the hint map
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 16, emb), nn.ReLU())
        self.head = nn.Linear(emb, num_classes)
        self.channels, self.emb_dim = c2, emb

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        fmap = self.features(x)
        emb = self.embed(fmap)
        return self.head(emb), fmap, emb


def teacher() -> SmallCNN:
    return SmallCNN(c1=32, c2=64, emb=128)


def student() -> SmallCNN:
    return SmallCNN(c1=4, c2=8, emb=16)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
