"""The verdict rule at its edges, and every claim's checks on constructed per-seed numbers."""

from __future__ import annotations

import math

import pytest

from batchnorm.experiments.claims import (
    consistency,
    cost,
    gradients,
    initialization,
    learning_rate,
    mechanism,
    recurrent,
    regularization,
    shift,
    small_batch,
    speed,
)
from batchnorm.experiments.result import conclude
from batchnorm.experiments.verdict import (
    BOOTSTRAP_FROM,
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    Check,
    decide,
    interval,
)

S, N, I = SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE  # noqa: E741 (a table of three letters)


@pytest.mark.parametrize("values, op, threshold, verdict, lean", [
    ([2.0, 3.0, 4.0], ">=", 2.0, S, S),            # the low end exactly at the threshold passes
    ([1.999, 3.0, 4.0], ">=", 2.0, I, S),          # just below it: straddles, median passes
    ([1.0, 1.5, 2.5], ">=", 2.0, I, N),            # straddles, median fails
    ([1.0, 1.9999], ">=", 2.0, N, N),              # high end just short
    ([0.0, 1.0, 2.0], ">", 0.0, I, S),             # strict: the low end at 0 does not pass
    ([1e-9, 1.0], ">", 0.0, S, S),
    ([0.5, 0.5, 0.5], "<=", 0.5, S, S),
    ([0.4, 0.5000001], "<=", 0.5, I, S),
    ([0.5000001, 0.9], "<=", 0.5, N, N),
    ([0.4, 0.49], "<", 0.5, S, S),
    ([0.4, 0.5], "<", 0.5, I, S),                  # strict: 0.5 fails, the median 0.45 passes
    ([math.inf, math.inf, math.inf], ">=", 5.0, S, S),  # "BN usable where nothing else is"
    ([0.0, math.inf, math.inf], ">=", 5.0, I, S),
    ([3.0], ">=", 2.0, S, S),                      # one seed: a point interval
])
def test_check_edges(values, op, threshold, verdict, lean):
    c = Check("x", tuple(values), op, threshold)
    assert (c.verdict, c.lean) == (verdict, lean)
    lo, hi, method = c.interval
    assert (lo, hi) == (min(values), max(values)) and method.startswith("min-max")


def test_interval_switches_to_bootstrap_and_is_reproducible():
    few = [1.0] * (BOOTSTRAP_FROM - 1)
    assert interval(few)[2] == f"min-max of {BOOTSTRAP_FROM - 1} seeds"
    many = [0.0] + [3.0 + 0.01 * i for i in range(BOOTSTRAP_FROM + 9)]  # one outlier in 20
    lo, hi, method = interval(many)
    assert "bootstrap" in method and interval(many) == (lo, hi, method)
    assert min(many) < lo <= hi <= max(many)
    # min/max would fail at the outlier; the interval of the median clears 2 throughout
    assert Check("x", tuple(many), ">=", 2.0).verdict == S


def test_bootstrap_keeps_infinite_values_usable():
    vals = [math.inf] * 6 + [4.0] * 6
    lo, hi, _ = interval(vals)
    assert lo == 4.0 and hi == math.inf
    assert Check("x", tuple(vals), ">=", 5.0).verdict == I


@pytest.mark.parametrize("values, exc, match", [
    ((), ValueError, "at least one"),
    ((1.0, float("nan")), ValueError, "NaN at seed 1"),
    (("a",), TypeError, "expected numbers"),
    ("12", TypeError, "sequence of numbers"),
    ((True,), TypeError, "expected numbers"),
])
def test_check_rejects_bad_values(values, exc, match):
    with pytest.raises(exc, match=match):
        Check("x", values, ">=", 1.0)


def test_indifference_zone():
    def v(*vals):
        c = Check("share", vals, "<=", 1 / 3, fail_at=2 / 3)
        return c.verdict, c.lean

    assert v(0.1, 1 / 3) == (S, S)
    assert v(0.4, 0.6) == (I, S)        # inside the zone: neither; the median 0.5 leans on <=
    assert v(0.6, 0.65) == (I, N)       # fails the threshold everywhere, but not decisively
    assert v(2 / 3, 0.9) == (N, N)      # at the far bar: decisive
    with pytest.raises(ValueError, match="fail_at: expected a value that fails"):
        Check("x", (1.0,), "<=", 0.5, fail_at=0.2)


def test_check_rejects_bad_op_and_threshold():
    with pytest.raises(ValueError, match="op: expected one of"):
        Check("x", (1.0,), "=>", 1.0)
    with pytest.raises(ValueError, match="threshold: expected a finite number"):
        Check("x", (1.0,), ">=", math.inf)


def test_decide():
    sup, nsup = Check("a", (3.0, 4.0), ">=", 2.0), Check("b", (0.0, 1.0), ">=", 2.0)
    straddle_up, straddle_down = Check("c", (1.0, 3.0, 4.0), ">=", 2.0), \
        Check("d", (0.0, 1.0, 3.0), ">=", 2.0)
    assert decide([sup, sup]) == (S, S)
    assert decide([nsup, nsup]) == (N, N)
    assert decide([sup, nsup]) == (I, N)            # the parts disagree: not decided either way
    assert decide([sup, straddle_up]) == (I, S)     # leans supported only if every check does
    assert decide([sup, straddle_down]) == (I, N)
    with pytest.raises(ValueError, match="checks"):
        decide([])


def _verdict(module, m):
    fn = getattr(module, "conclude", conclude)
    return fn(module.judge(m))[:2]


def _speed(bn, plain):
    total = 1000
    ratio = [0.0 if b is None else (total if p is None else p) / b
             for b, p in zip(bn, plain, strict=True)]
    return {"ratio": ratio, "steps_to_target_plain": plain}


def test_speed():
    assert _verdict(speed, _speed([100, 50, 40], [500, None, 200])) == (S, S)
    assert _verdict(speed, _speed([100, 100, 100], [500, 150, 300])) == (I, S)
    assert _verdict(speed, _speed([300, None, 200], [200, 100, 300])) == (N, N)
    assert "lower bound" in speed.agreement(_speed([100], [None]))


def test_shift():
    assert _verdict(shift, {"drift_bn": [0.2, 0.1], "drift_plain": [1.0, 2.0]}) == (S, S)
    assert _verdict(shift, {"drift_bn": [0.2, 0.7], "drift_plain": [1.0, 1.0]}) == (I, S)
    assert _verdict(shift, {"drift_bn": [1.2, 0.8], "drift_plain": [1.0, 1.0]}) == (N, N)


def test_shift_drift_metric():
    import numpy as np

    still = np.tile(np.array([[-1.0], [0.0], [1.0]]), (5, 1, 1))  # (time, pct, unit)
    moving = still + np.arange(5)[:, None, None]
    assert shift.drift(still) == 0.0 and shift.drift(moving) == pytest.approx(2.0)


def test_learning_rate():
    lrs = [0.01, 0.0316, 0.1, 0.316, 1.0]
    plain = [0.9, 0.95, 0.5, 0.1, 0.1]  # largest usable without BN: 0.0316
    wide = [0.9, 0.95, 0.95, 0.95, 0.1]  # with BN up to 0.316: 10x
    narrow = [0.9, 0.95, 0.95, 0.1, 0.1]  # with BN up to 0.1: 3.16x
    m = {"lrs": lrs, "per_seed_plain": [plain, plain]}
    assert _verdict(learning_rate, {**m, "per_seed_bn": [wide, wide]}) == (S, S)
    assert _verdict(learning_rate, {**m, "per_seed_bn": [wide, narrow]}) == (I, S)
    assert _verdict(learning_rate, {**m, "per_seed_bn": [narrow, narrow]}) == (N, N)
    nothing = [0.1] * 5  # BN usable nowhere: ratio 0
    assert learning_rate.judge({**m, "per_seed_bn": [nothing, wide]})[0].values[0] == 0.0
    # usable only with BN: an infinite multiple
    assert learning_rate.ratio(1.0, None) == math.inf


def test_initialization():
    plain = [0.1, 0.9, 0.95, 0.2]
    good, fair, bad = [0.93, 0.95, 0.96, 0.9], [0.5, 0.95, 0.96, 0.9], [0.05, 0.95, 0.96, 0.9]
    m = {"scales": [0.01, 0.1, 1, 10], "per_seed_plain": [plain, plain]}
    assert _verdict(initialization, {**m, "per_seed_bn": [good, good]}) == (S, S)
    assert _verdict(initialization, {**m, "per_seed_bn": [good, fair]})[0] == I
    assert _verdict(initialization, {**m, "per_seed_bn": [bad, bad]}) == (N, N)
    assert initialization._ratio(0.0, 0.0) == 1.0 and initialization._ratio(0.1, 0.0) == math.inf


def _reg(train_bn, test_bn):
    return {"per_seed_train": {"BN": train_bn, "neither": [1.0, 1.0]},
            "per_seed_test": {"BN": test_bn, "neither": [0.90, 0.90]}}


def test_regularization():
    assert _verdict(regularization, _reg([1.0, 1.0], [0.93, 0.95])) == (S, S)
    assert _verdict(regularization, _reg([1.0, 1.0], [0.93, 0.91]))[0] == I  # 1 point narrower
    assert _verdict(regularization, _reg([1.0, 0.95], [0.89, 0.80])) == (N, N)


def _grad(bn_init, bn_trained):
    return {"spread_init_bn": bn_init, "spread_init_plain": [5.0, 5.0],
            "spread_trained_bn": bn_trained, "spread_trained_plain": [5.0, 5.0]}


def test_gradients():
    assert _verdict(gradients, _grad([0.5, 0.6], [0.5, 0.5])) == (S, S)
    assert _verdict(gradients, _grad([0.5, 0.6], [4.5, 4.5])) == (I, N)
    assert _verdict(gradients, _grad([4.5, 6.0], [4.5, 6.0])) == (N, N)
    both_inf = {**_grad([1.0, 1.0], [1.0, 1.0]), "spread_init_bn": [math.inf, 1.0],
                "spread_init_plain": [math.inf, 5.0]}
    assert gradients.judge(both_inf)[0].values == (0.0, 4.0)
    assert gradients.spread([1.0, 1e-3]) == pytest.approx(3.0)
    assert gradients.spread([1.0, 0.0]) == float("inf")


def _small(bn_small, renorm_small):
    per_seed = {"BN": [bn_small, [0.95, 0.95]], "GroupNorm": [[0.9, 0.9], [0.9, 0.9]],
                "Batch Renorm": [renorm_small, [0.9, 0.9]], "ghost BN": [[0.8, 0.8], [0.9, 0.9]]}
    return {"batches": [2, 32], "per_seed": per_seed}


def test_small_batch():
    assert _verdict(small_batch, _small([0.6, 0.7], [0.85, 0.8])) == (S, S)
    assert _verdict(small_batch, _small([0.6, 0.7], [0.5, 0.6]))[0] == I
    assert _verdict(small_batch, _small([0.95, 0.94], [0.9, 0.9])) == (N, N)


def _rec(bn_steps, plain_steps, bn_final, plain_final):
    return {"steps": 100, "steps_to_target": {"BN-LSTM": bn_steps, "LSTM": plain_steps},
            "final": {"BN-LSTM": bn_final, "LSTM": plain_final}}


def test_recurrent():
    assert _verdict(recurrent, _rec([20, 30], [None, 60], [0.9, 0.9], [0.7, 0.8])) == (S, S)
    assert _verdict(recurrent, _rec([50, 50], [50, 50], [0.9, 0.9], [0.7, 0.8]))[0] == I
    assert _verdict(recurrent, _rec([None, None], [50, 50], [0.6, 0.6], [0.7, 0.8])) == (N, N)


def _cost(with_bn, folded_ms, diff=1e-6):
    return {"train_ms": {"no norm": [1.0, 1.0], "torch BN": with_bn, "our BN": [1.1, 1.1]},
            "infer_ms_unfolded": [2.0, 2.0], "infer_ms_folded": folded_ms,
            "max_abs_diff": [diff, diff]}


def test_cost():
    assert _verdict(cost, _cost([1.2, 1.3], [1.5, 1.6])) == (S, S)
    assert _verdict(cost, _cost([1.01, 1.2], [1.5, 1.6]))[0] == I
    assert _verdict(cost, _cost([1.2, 1.3], [1.5, 1.6], diff=0.1))[0] == I
    assert _verdict(cost, _cost([0.9, 1.0], [2.5, 2.2], diff=0.1)) == (N, N)


def test_consistency():
    def m(running, recal):
        return {"per_seed": {"batch": [0.9, 0.9], "running": running, "recalibrated": recal}}

    assert _verdict(consistency, m([0.8, 0.85], [0.89, 0.9])) == (S, S)
    assert _verdict(consistency, m([0.8, 0.85], [0.82, 0.86]))[0] == I
    assert _verdict(consistency, m([0.9, 0.9], [0.8, 0.85])) == (N, N)
    # no gap at all and none after: the "closes half" check counts it as closed
    assert consistency.judge(m([0.9, 0.9], [0.9, 0.9]))[1].values == (1.0, 1.0)


def _mech(noisy_drift, noisy_speed):
    return {"drift_noisy": noisy_drift, "drift_plain": [1.0, 1.0],
            "speed_noisy": noisy_speed, "speed_bn": [0.9, 0.9], "speed_plain": [0.5, 0.5],
            "loss_variation_plain": [2.0, 2.0], "loss_variation_bn": [1.0, 1.0]}


def test_mechanism():
    # more shift than without BN, and the speed-up is gone: the explanation holds
    assert _verdict(mechanism, _mech([2.0, 3.0], [0.5, 0.6])) == (S, S)
    # more shift, and most of the speed-up kept (Santurkar et al.'s finding): it does not
    assert _verdict(mechanism, _mech([2.0, 3.0], [0.85, 0.88])) == (N, N)
    # about half kept: backs neither explanation
    assert _verdict(mechanism, _mech([2.0, 3.0], [0.68, 0.7])) == (I, S)
    # the noise did not raise the shift to no-BN's level: nothing is tested
    assert _verdict(mechanism, _mech([0.5, 3.0], [0.85, 0.88])) == (I, N)
    assert mechanism.retained(0.7, 0.9, 0.5) == pytest.approx(0.5)
    assert mechanism.retained(0.7, 0.5, 0.6) == 1.0  # BN no faster: nothing to lose
    assert "disagrees" in mechanism.agreement(_mech([2.0, 3.0], [0.5, 0.6]))
