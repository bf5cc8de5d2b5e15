"""Small reference models used by the examples, experiments and tests."""

from __future__ import annotations

from torch import Tensor, nn


class LogisticRegression(nn.Linear):
    """Multinomial logistic regression: a linear map to ``num_classes`` logits."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__(num_features, num_classes)


class MLP(nn.Sequential):
    """``num_features -> hidden... -> num_outputs`` with tanh (smooth, so Hessians are informative)."""

    def __init__(self, num_features: int, hidden: tuple[int, ...], num_outputs: int) -> None:
        layers: list[nn.Module] = []
        width = num_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, num_outputs))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """A compact CNN for ``(n, 1, 8, 8)`` digit images: two convolutions and a linear head."""

    def __init__(self, num_classes: int = 10, channels: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.Softplus(),
            nn.Conv2d(channels, channels, 3, padding=1, stride=2),
            nn.Softplus(),
            nn.Flatten(),
        )
        self.head = nn.Linear(channels * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
