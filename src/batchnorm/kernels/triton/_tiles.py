"""Device helpers shared by the Triton kernels: the tile of a program, sums, ``pre``, ``scale``.

Every input is viewed as ``(R, C, S)`` (channels-last ``(M, C)`` as ``(M, C, 1)``); a program of
the 1-D grid works on a tile ``(BLOCK_R, BLOCK_C, BLOCK_S)`` and per-channel results reduce axes
0 and 2 (the package docstring, :mod:`batchnorm.kernels.triton`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(pid, R, C, S, stride_r, stride_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
          BLOCK_S: tl.constexpr, INT64: tl.constexpr):
    """Tile ``pid`` of the 1-D grid: ``(offsets, mask)`` of shape (BR, BC, BS), its channels
    ``cols`` (BC,) with their mask, its chunk index ``k`` and the offset of each channel's
    first sample ``x[0, c, 0]`` (the shift K, the same for every tile of the channel)."""
    n_cb = tl.cdiv(C, BLOCK_C)
    n_sb = tl.cdiv(S, BLOCK_S)
    pid_c = pid % n_cb
    k = pid // n_cb
    r0 = (k // n_sb) * BLOCK_R
    s0 = (k % n_sb) * BLOCK_S
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if INT64:  # more than 2**31 elements: 32-bit offsets would wrap
        r0 = r0.to(tl.int64)
        cols = cols.to(tl.int64)
    rows = r0 + tl.arange(0, BLOCK_R)
    sp = s0 + tl.arange(0, BLOCK_S)
    r3 = rows[:, None, None]
    c3 = cols[None, :, None]
    s3 = sp[None, None, :]
    mask = (r3 < R) & (c3 < C) & (s3 < S)
    offs = r3 * stride_r + c3 * stride_c + s3
    first = cols * stride_c  # (BC,): x[0, c, 0]
    return offs, mask, cols, cols < C, k, first


@triton.jit
def _sum3(t):
    """Per-channel sum of a (BR, BC, BS) tile."""
    return tl.sum(tl.sum(t, axis=2), axis=0)


@triton.jit
def _pre(xc, scale, b_ptr, res_ptr, cols, cmask, offs, mask,
         HAS_B: tl.constexpr, HAS_RES: tl.constexpr):
    """pre = (x - mean)·scale + β + residual, from ``xc = x - mean``."""
    pre = xc * scale[None, :, None]
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        pre += b[None, :, None]
    if HAS_RES:
        pre += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return pre


@triton.jit
def _channel_scale(scale_ptr, rstd, w_ptr, cols, cmask,
                   HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr):
    """scale = γ·rstd per channel: given (a primitive's argument) or computed from γ."""
    if HAS_SCALE:
        scale = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
    elif HAS_W:
        scale = rstd * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        scale = rstd
    return scale
