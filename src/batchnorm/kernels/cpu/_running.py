"""The running-statistics blend of the ``cpu`` backend, one Numba call."""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def running_blend(rm, rv, mean, var, bessel, factor):
    """:meth:`Backend.blend_running <batchnorm.kernels.base.Backend.blend_running>` of ``mean``
    and ``var·bessel`` (a scalar of ``var``'s dtype: 1 for an unbiased ``var``, else the product
    ``stats.unbiased_var`` computes, rounded to that dtype as torch rounds it): nothing written
    unless every batch statistic is finite; the blend in float64 (no fastmath: the same IEEE
    operations, in the same order, as ``stats.blend``), rounded once on the store.

    Args:
        rm, rv: the running mean and variance, ``(C,)`` float32 or float64, updated in place.
        mean, var: the batch mean and variance, ``(C,)`` float32 or float64.
        bessel: the factor that makes ``var`` unbiased, a scalar of ``var``'s dtype.
        factor: the weight of the batch statistics in the blend (the momentum), a float.

    Returns:
        Whether the statistics were finite and the buffers written.
    """
    C = mean.shape[0]
    for c in range(C):
        if not (math.isfinite(mean[c]) and math.isfinite(var[c] * bessel)):
            return False
    keep = 1.0 - factor
    for c in range(C):
        rm[c] = factor * np.float64(mean[c]) + keep * np.float64(rm[c])
        rv[c] = factor * np.float64(var[c] * bessel) + keep * np.float64(rv[c])
    return True
