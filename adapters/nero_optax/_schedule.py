"""Hyperparameters that may be optax schedules: a number, a 0-d array, or a function of the step count."""

from __future__ import annotations

from typing import Any

from nero_core._base import check_hyperparameter

__all__ = ["check_scheduled", "value_at"]


def check_scheduled(name: str, value: Any, *, low: float, high: float, high_open: bool) -> None:
    """Check a number against its range now; a schedule's values are its own (as optax takes them)."""
    if not callable(value):
        check_hyperparameter(name, value, low=low, high=high, high_open=high_open)


def value_at(value: Any, count: Any) -> Any:
    """The hyperparameter for the update after ``count`` updates: ``value(count)`` for a schedule, else ``value``."""
    return value(count) if callable(value) else value
