"""A torchmetrics object holding per-case values, reduced across ranks by concatenation.

Means are taken only after the values are gathered and put in case order: a sum reduced rank by rank would
add the same numbers in another order (and differ in the last bits), so the summary of N processes would
not be the summary of one. The values also give the confidence interval.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat


class CaseValues(Metric):
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("value", default=[], dist_reduce_fx="cat")

    def update(self, index: int, value: float) -> None:
        self.index.append(torch.tensor([float(index)], dtype=torch.float64, device=self.device))
        self.value.append(torch.tensor([float(value)], dtype=torch.float64, device=self.device))

    def compute(self) -> list[tuple[int, float]]:
        """(case index, value) pairs of every rank, in case order."""
        if isinstance(self.index, list) and not self.index:
            return []
        idx, val = dim_zero_cat(self.index).double(), dim_zero_cat(self.value).double()
        order = torch.argsort(idx, stable=True)
        return [(int(i), float(v)) for i, v in zip(idx[order].tolist(), val[order].tolist())]
