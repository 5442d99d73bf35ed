"""Verdict logic on constructed results: each criterion's three outcomes."""

from __future__ import annotations

import pytest

from batchnorm.experiments.claims import (
    consistency,
    cost,
    gradients,
    initialization,
    learning_rate,
    recurrent,
    regularization,
    shift,
    small_batch,
    speed,
)
from batchnorm.experiments.result import MIXED, NOT_SUPPORTED, SUPPORTED, combine


def test_combine():
    assert combine([True, True]) == SUPPORTED
    assert combine([False, False]) == NOT_SUPPORTED
    assert combine([True, False]) == MIXED
    with pytest.raises(ValueError, match="checks"):
        combine([])


def _speed(bn, plain):
    return {"target": 0.9, "steps": 1000, "steps_to_target_bn": bn, "steps_to_target_plain": plain}


def test_speed():
    assert speed.judge(_speed([100], [500]))[0] == SUPPORTED
    assert speed.judge(_speed([100], [None]))[0] == SUPPORTED  # lower bound 10
    assert speed.judge(_speed([100], [150]))[0] == MIXED
    assert speed.judge(_speed([300], [200]))[0] == NOT_SUPPORTED
    assert speed.judge(_speed([None], [200]))[0] == NOT_SUPPORTED
    assert "lower bound" in speed.judge(_speed([100], [None]))[1]


def test_shift():
    assert shift.judge({"drift_bn": 0.2, "drift_plain": 1.0})[0] == SUPPORTED
    assert shift.judge({"drift_bn": 0.7, "drift_plain": 1.0})[0] == MIXED
    assert shift.judge({"drift_bn": 1.2, "drift_plain": 1.0})[0] == NOT_SUPPORTED


def test_shift_drift_metric():
    import numpy as np

    still = np.tile(np.array([[-1.0], [0.0], [1.0]]), (5, 1, 1))  # (time, pct, unit)
    moving = still + np.arange(5)[:, None, None]
    assert shift.drift(still) == 0.0 and shift.drift(moving) == pytest.approx(2.0)


def test_learning_rate():
    lrs = [0.01, 0.1, 1.0, 10.0]
    m = {"lrs": lrs, "acc_plain": [0.9, 0.95, 0.1, 0.1]}
    assert learning_rate.judge({**m, "acc_bn": [0.95, 0.96, 0.95, 0.1]})[0] == SUPPORTED
    assert learning_rate.judge({**m, "acc_bn": [0.95, 0.96, 0.5, 0.1]})[0] == NOT_SUPPORTED
    m2 = {"lrs": [0.1, 0.3, 1.0], "acc_plain": [0.95, 0.1, 0.1]}
    assert learning_rate.judge({**m2, "acc_bn": [0.95, 0.95, 0.1]})[0] == MIXED
    assert learning_rate.judge({**m2, "acc_bn": [0.1, 0.1, 0.1]})[0] == NOT_SUPPORTED


def test_initialization():
    plain = [0.1, 0.9, 0.95, 0.2]
    assert initialization.judge({"acc_plain": plain, "acc_bn": [0.93, 0.95, 0.96, 0.9]})[0] \
        == SUPPORTED
    assert initialization.judge({"acc_plain": plain, "acc_bn": [0.5, 0.95, 0.96, 0.9]})[0] \
        == MIXED
    assert initialization.judge({"acc_plain": plain, "acc_bn": [0.05, 0.95, 0.96, 0.9]})[0] \
        == NOT_SUPPORTED


def _reg(gap_bn, test_bn):
    return {"gap": {"BN": gap_bn, "neither": 0.10, "dropout": 0.08},
            "test_acc": {"BN": test_bn, "neither": 0.90}}


def test_regularization():
    assert regularization.judge(_reg(0.05, 0.92))[0] == SUPPORTED
    assert regularization.judge(_reg(0.05, 0.85))[0] == MIXED
    assert regularization.judge(_reg(0.09, 0.92))[0] == MIXED
    assert regularization.judge(_reg(0.12, 0.92))[0] == NOT_SUPPORTED


def _grad(bn_init, bn_trained):
    return {"steps": 10, "spread_init_bn": bn_init, "spread_init_plain": 5.0,
            "spread_trained_bn": bn_trained, "spread_trained_plain": 5.0}


def test_gradients():
    assert gradients.judge(_grad(0.5, 0.5))[0] == SUPPORTED
    assert gradients.judge(_grad(0.5, 4.5))[0] == MIXED
    assert gradients.judge(_grad(4.5, 6.0))[0] == NOT_SUPPORTED
    assert gradients.spread([1.0, 1e-3]) == pytest.approx(3.0)
    assert gradients.spread([1.0, 0.0]) == float("inf")


def _small(bn, renorm_small):
    return {"batches": [2, 64], "acc": {"BN": bn, "GroupNorm": [0.9, 0.9],
                                        "Batch Renorm": [renorm_small, 0.9],
                                        "ghost BN": [0.8, 0.9]}}


def test_small_batch():
    assert small_batch.judge(_small([0.6, 0.95], 0.85))[0] == SUPPORTED
    assert small_batch.judge(_small([0.6, 0.95], 0.5))[0] == MIXED
    assert small_batch.judge(_small([0.9, 0.9], 0.8))[0] == NOT_SUPPORTED


def _rec(bn_steps, plain_steps, bn_final, plain_final):
    return {"steps": 100, "steps_to_target": {"BN-LSTM": bn_steps, "LSTM": plain_steps},
            "final": {"BN-LSTM": bn_final, "LSTM": plain_final}}


def test_recurrent():
    assert recurrent.judge(_rec([20], [None], [0.9], [0.7]))[0] == SUPPORTED
    assert recurrent.judge(_rec([50], [50], [0.9], [0.7]))[0] == MIXED
    assert recurrent.judge(_rec([None], [50], [0.6], [0.7]))[0] == NOT_SUPPORTED


def _cost(with_bn, folded_ms, acc_folded=0.9, diff=1e-6):
    return {"train_ms": {"no norm": 1.0, "torch BN": with_bn, "our BN": 1.1},
            "infer_ms_unfolded": 2.0, "infer_ms_folded": folded_ms, "acc_unfolded": 0.9,
            "acc_folded": acc_folded, "max_abs_diff": diff}


def test_cost():
    assert cost.judge(_cost(1.2, 1.5))[0] == SUPPORTED
    assert cost.judge(_cost(1.01, 1.5))[0] == MIXED
    assert cost.judge(_cost(1.2, 1.5, diff=0.1))[0] == MIXED
    assert cost.judge(_cost(0.9, 2.5, acc_folded=0.8))[0] == NOT_SUPPORTED


def test_consistency():
    m = {"acc_batch_stats": 0.9}
    assert consistency.judge({**m, "acc_running": 0.8, "acc_recalibrated": 0.89})[0] == SUPPORTED
    assert consistency.judge({**m, "acc_running": 0.8, "acc_recalibrated": 0.82})[0] == MIXED
    assert consistency.judge({**m, "acc_running": 0.9, "acc_recalibrated": 0.8})[0] \
        == NOT_SUPPORTED
