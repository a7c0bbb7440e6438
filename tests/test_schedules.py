"""Tests for the schedules in nanochat/optim.py: the LR multiplier and the Muon momentum ramp, point by point."""

import pytest

from nanochat.optim import lr_multiplier, muon_momentum


def test_lr_constant_then_linear_warmdown_to_zero():
    T = 100  # warmdown over the last 20 steps
    assert [lr_multiplier(t, T) for t in (0, 50, 79, 80)] == [1.0] * 4
    assert lr_multiplier(81, T) == pytest.approx(19 / 20)
    assert lr_multiplier(90, T) == pytest.approx(0.5)
    assert lr_multiplier(99, T) == pytest.approx(1 / 20)
    assert lr_multiplier(100, T) == 0.0
    values = [lr_multiplier(t, T) for t in range(T + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never rises


def test_lr_warmup_and_final_fraction():
    T = 50
    assert [lr_multiplier(t, T, warmup_ratio=0.1) for t in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr_multiplier(T, T, final_lr_frac=0.1) == pytest.approx(0.1)
    assert lr_multiplier(45, T, final_lr_frac=0.1) == pytest.approx(0.5 + 0.5 * 0.1)
    # chat_sft's "linear to zero": warmdown over the whole run
    assert [lr_multiplier(t, 4, warmdown_ratio=1.0) for t in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_muon_momentum_ramp():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)
