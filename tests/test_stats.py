"""The statistics module: partials, merge, finalize, against float64 definitions."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchnorm import stats as S


def _ref(x: torch.Tensor):
    xd = x.double()
    dims = (0, 2) if x.dim() == 3 else (0,)
    mean = xd.mean(dims)
    shape = (1, -1, 1) if x.dim() == 3 else (1, -1)
    return mean, (xd - mean.view(shape)).square().sum(dims)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=5), c=st.integers(1, 4),
       offset=st.sampled_from([0.0, 100.0, -1e4]), channels_last=st.booleans())
def test_merge_many_equals_statistics_of_the_concatenation(sizes, c, offset, channels_last):
    chunks = [torch.randn(n, c, 3, dtype=torch.float64) + offset for n in sizes]
    if channels_last:
        chunks = [t.permute(0, 2, 1).reshape(-1, c) for t in chunks]
    parts = [S.channel_partials(t) for t in chunks]
    merged = S.merge_many(S.Partials(torch.stack([p.n for p in parts]),
                                     torch.stack([p.mean for p in parts]),
                                     torch.stack([p.m2 for p in parts])))
    total = sum(sizes)
    if total == 0:
        assert torch.all(merged.n == 0) and torch.all(merged.mean == 0)
        return
    mean, m2 = _ref(torch.cat(chunks))
    torch.testing.assert_close(merged.mean, mean, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(merged.m2, m2, rtol=1e-9, atol=1e-9)
    pair = S.merge(parts[0], S.Partials(parts[-1].n, parts[-1].mean, parts[-1].m2))
    if len(parts) == 2:
        torch.testing.assert_close(pair.mean, merged.mean)


def test_shifted_partials_are_accurate_in_float32():
    x = (torch.randn(64, 3, 500, dtype=torch.float64) * 0.1 + 1e4)
    x32 = x.float()
    p = S.channel_partials(x32)
    mean, m2 = _ref(x32)
    # the mean within one rounding of float32 at 1e4, m2 to float32 precision of sigma^2
    assert (p.mean.double() - mean).abs().max() <= 1e4 * 2 ** -23
    torch.testing.assert_close(p.m2.double(), m2, rtol=1e-4, atol=0)


def test_finalize_unbiased_and_update():
    p = S.Partials(torch.tensor(4.0), torch.tensor([1.0]), torch.tensor([6.0]))
    mean, var, rstd = S.finalize(p, 0.0)
    assert var.item() == 1.5 and S.unbiased_var(var, 4).item() == 2.0
    torch.testing.assert_close(rstd, torch.tensor([1.5 ** -0.5]))
    ok = torch.tensor(True)
    r = S.update_running(torch.tensor([0.0]), torch.tensor([1.0], dtype=torch.float64), 0.25, ok)
    assert r.item() == 0.25 and r.dtype == torch.float32
    r = S.update_running(torch.tensor([3.0]), torch.tensor([1.0]), 0.25, ~ok)
    assert r.item() == 3.0
    assert S.accumulation_dtype(torch.float16) == torch.float32
    assert S.accumulation_dtype(torch.float64) == torch.float64
