"""A model torch.export cannot capture: Python control flow on a tensor's value."""
import torch.nn as nn


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:  # data-dependent branch
            y = y * 2
        return self.head(y.mean((2, 3)))


def branchy():
    return Branchy()
