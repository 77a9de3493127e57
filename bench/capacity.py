"""The capacity search both harnesses run: the highest arrival rate a mode serves within its SLO.

Pure and synchronous, so the engine replay (``bench.engine.replay``, which measures a rate by replaying
against real processes) and the simulator (``bench.sim.scenarios``, which simulates one) drive the same
search: climb an ascending ladder of rates until one breaks the SLO, then bisect ``refine`` times
between the highest passing and the first failing rate::

    search = Ladder(rates, refine)
    while (rate := search.next_rate()) is not None:
        search.record(rate, within_slo=measure(rate))

The answer is a bracket: the true capacity lies in ``[within, beyond)`` (``beyond`` is None when every
rate passed: ``within`` is then only a lower bound).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence


class Ladder:
    """One capacity search (see the module docstring)."""

    def __init__(self, rates: Sequence[float], refine: int) -> None:
        if not rates:
            raise ValueError("a capacity search needs at least one rate")
        if any(b <= a for a, b in itertools.pairwise(rates)) or rates[0] <= 0:
            raise ValueError(f"rates must be positive and ascending, got {list(rates)}")
        if refine < 0:
            raise ValueError(f"refine must be >= 0, got {refine}")
        self._ladder = list(rates)
        self._refine = refine
        self._climbing = True
        self._bisections = 0
        self.within = 0.0
        """The highest rate measured within the SLO (0 while none has passed)."""
        self.beyond: float | None = None
        """The lowest rate measured beyond the SLO (None while none has failed)."""
        self.measured: list[tuple[float, bool]] = []
        """Every rate measured, in order, and whether it was within the SLO."""

    def next_rate(self) -> float | None:
        """The rate to measure next, or None when the search is done."""
        if self._climbing:
            climbed = len(self.measured)
            return self._ladder[climbed] if climbed < len(self._ladder) else None
        if self.beyond is None or self._bisections >= self._refine:
            return None
        return round((self.within + self.beyond) / 2, 4)

    def record(self, rate: float, *, within_slo: bool) -> None:
        """The outcome of measuring ``rate`` (the rate :meth:`next_rate` returned)."""
        expected = self.next_rate()
        if expected is None or rate != expected:
            raise ValueError(f"measured {rate}, but the search asked for {expected}")
        self.measured.append((rate, within_slo))
        if not self._climbing:
            self._bisections += 1
        if within_slo:
            self.within = rate
        else:
            self.beyond = rate  # climbing stops at the first failure; a failing bisection is lower
            self._climbing = False
