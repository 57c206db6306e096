"""AdaLoRA's rank allocator: which singular values (entries of E) each site keeps.

After every optimizer step the allocator updates, for every entry of every site's A, E and B,
an exponential moving average of its sensitivity ``|p * grad|`` (``beta1``) and of that
sensitivity's deviation from its average, the uncertainty (``beta2``). A triplet ``(A[i], E[i],
B[:, i])`` scores ``s(E[i]) + mean s(A[i, :]) + mean s(B[:, i])`` with ``s = average *
uncertainty``. The budget (kept triplets over all sites) starts at the sum of the initial ranks,
stays there until ``tinit``, shrinks on a cubic schedule to ``target_r`` per site at
``total_step - tfinal``, and the triplets scoring at or below the budget's threshold get E zeroed.
At ``total_step - tfinal`` the mask is final; after it, each step re-applies it. The numbers and
the step convention are PEFT's (``RankAllocator`` and ``AdaLoraModel.update_and_allocate``).

>>> E = torch.nn.Parameter(torch.tensor([[1.0], [2.0]]))
>>> t = Triplet("q", torch.nn.Parameter(torch.ones(2, 3)), E, torch.nn.Parameter(torch.ones(3, 2)))
>>> allocator = RankAllocator(Schedule(target_r=1, tinit=0, tfinal=0, total_step=4, delta_t=1,
...                                    beta1=0.85, beta2=0.85), [t])
>>> allocator.budget(0), allocator.budget(2), allocator.budget(4)
((2, False), (1, True), (1, True))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxpeft.errors import FxpeftError


@dataclass(frozen=True)
class Schedule:
    """The allocator's knobs (PEFT's ``AdaLoraConfig`` names: ``deltaT`` is ``delta_t``)."""

    target_r: int
    tinit: int
    tfinal: int
    total_step: int
    delta_t: int
    beta1: float
    beta2: float


@dataclass(frozen=True)
class Triplet:
    """One site's parameters: ``A`` (r, in), ``E`` (r, 1), ``B`` (out, r)."""

    path: str
    A: torch.nn.Parameter
    E: torch.nn.Parameter
    B: torch.nn.Parameter

    def parameters(self) -> tuple[torch.nn.Parameter, ...]:
        return (self.A, self.E, self.B)


class RankAllocator:
    """The moving averages, the budget schedule and the current mask of one adapter.

    ``rank_pattern``: site path -> kept entries (a bool tensor), None before the first mask.
    ``steps``: optimizer steps seen, the step number when allocation runs by itself.
    """

    def __init__(self, schedule: Schedule, triplets: list[Triplet]) -> None:
        self.schedule, self.triplets = schedule, triplets
        self.initial = sum(t.E.shape[0] for t in triplets)
        self.target = schedule.target_r * len(triplets)
        self.rank_pattern: dict[str, torch.Tensor] | None = None
        self.steps = 0
        self.reset()

    def reset(self) -> None:
        """Forget the moving averages (PEFT's ``reset_ipt``)."""
        self.average: dict[int, torch.Tensor] = {}
        self.uncertainty: dict[int, torch.Tensor] = {}

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for t in self.triplets for p in t.parameters()]

    def budget(self, step: int) -> tuple[int, bool]:
        """The number of triplets to keep at ``step``, and whether to mask at it."""
        s = self.schedule
        if step <= s.tinit:
            return self.initial, False
        if step > s.total_step - s.tfinal:
            return self.target, True
        left = 1 - (step - s.tinit) / (s.total_step - s.tfinal - s.tinit)
        return int((self.initial - self.target) * left ** 3 + self.target), step % s.delta_t == 0

    def update_scores(self) -> None:
        """Fold every adapter entry's current ``|p * grad|`` into the moving averages."""
        b1, b2 = self.schedule.beta1, self.schedule.beta2
        with torch.no_grad():
            for p in self.parameters():
                if p.grad is None:
                    raise FxpeftError("AdaLoRA rank allocation needs the gradients of the step: "
                                      "run it after loss.backward() and before zero_grad()")
                key = id(p)
                sensitivity = (p * p.grad).abs().detach()
                average = b1 * self.average.get(key, torch.zeros_like(p)) + (1 - b1) * sensitivity
                self.average[key] = average
                self.uncertainty[key] = b2 * self.uncertainty.get(key, torch.zeros_like(p)) + \
                    (1 - b2) * (sensitivity - average).abs()

    def _score(self, p: torch.nn.Parameter) -> torch.Tensor:
        return self.average[id(p)] * self.uncertainty[id(p)]

    def triplet_scores(self, t: Triplet) -> torch.Tensor:
        """One score per triplet of site ``t``: E's, plus the row mean of A's, plus the column
        mean of B's (in PEFT's order of additions)."""
        rows = torch.mean(self._score(t.A), dim=1, keepdim=True)
        columns = torch.mean(self._score(t.B), dim=0, keepdim=False).view(-1, 1)
        return self._score(t.E).view(-1) + torch.cat([rows, columns], dim=1).sum(dim=1).view(-1)

    def mask_to_budget(self, budget: int) -> None:
        """Keep the ``budget`` best triplets over all sites (ties at the threshold go), zero E
        for the rest, and record the mask."""
        scores = {t.path: self.triplet_scores(t) for t in self.triplets}
        pruned = self.initial - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=pruned)[0].item() \
            if pruned > 0 else -float("inf")
        self.rank_pattern = {path: ~(score <= threshold) for path, score in scores.items()}
        self.apply_mask()

    def apply_mask(self) -> None:
        """Zero E where the recorded mask drops a triplet."""
        if self.rank_pattern is None:
            return
        with torch.no_grad():
            for t in self.triplets:
                keep = self.rank_pattern[t.path].to(t.E.device).view(-1, 1)
                t.E.masked_fill_(~keep, 0.0)

    def update_and_allocate(self, step: int) -> None:
        """One step of PEFT's ``update_and_allocate``: scores (until the final mask), the mask
        when the schedule says so, the final mask at ``total_step - tfinal``, and re-applying it
        after."""
        final = self.schedule.total_step - self.schedule.tfinal
        if step > final:
            self.apply_mask()
            return
        if step < final:
            self.update_scores()
        budget, mask = self.budget(step)
        if mask or step == final:
            self.mask_to_budget(budget)
        if step == final:
            self.reset()

    def ranks(self) -> dict[str, int]:
        """Site path -> triplets kept (the initial rank before any mask).

        >>> t = Triplet("q", *(torch.nn.Parameter(torch.ones(s)) for s in ((2, 1), (2, 1), (1, 2))))
        >>> RankAllocator(Schedule(1, 0, 0, 2, 1, 0.85, 0.85), [t]).ranks()
        {'q': 2}
        """
        if self.rank_pattern is None:
            return {t.path: t.E.shape[0] for t in self.triplets}
        return {path: int(keep.sum()) for path, keep in self.rank_pattern.items()}
