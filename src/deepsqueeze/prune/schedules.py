"""Sparsity schedules: functions ``(step, total_steps) -> sparsity`` (Torch-Pruning's style).

The driver prunes whenever the scheduled sparsity rises; masks stay enforced in between.
"""

from __future__ import annotations

from collections.abc import Callable

SparsitySchedule = Callable[[int, int], float]


def one_shot(final: float) -> SparsitySchedule:
    """Everything at once, before fine-tuning starts."""
    return lambda step, total: final


def iterative(final: float, rounds: int) -> SparsitySchedule:
    """``rounds`` equal steps in the kept fraction: round r keeps (1 - final)^((r + 1) / rounds)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")

    def schedule(step: int, total: int) -> float:
        r = min(rounds - 1, step * rounds // max(total, 1))
        return 1.0 - (1.0 - final) ** ((r + 1) / rounds)

    return schedule


def agp(final: float, initial: float = 0.0, start: float = 0.0, end: float = 0.75,
        frequency: int = 1) -> SparsitySchedule:
    """Zhu & Gupta's automated gradual pruning: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3.

    ``start``/``end`` are fractions of the fine-tuning steps; sparsity changes every ``frequency`` steps
    and holds at ``final`` after ``end`` so the network recovers.
    """
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"AGP needs 0 <= start < end <= 1, got start={start}, end={end}")

    def schedule(step: int, total: int) -> float:
        t0, t1 = start * total, end * total
        step = (step // frequency) * frequency
        if step < t0:
            return initial
        progress = min(1.0, (step - t0) / max(t1 - t0, 1e-9))
        return final + (initial - final) * (1.0 - progress) ** 3

    return schedule
