"""BNLSTMCell / BNLSTM against Cooijmans et al. (2016) written directly in float64."""

from __future__ import annotations

import copy

import pytest
import torch

import batchnorm


def _bn(z, w, b, eps):
    """Batch statistics over dimension 0 (training), float64."""
    mean = z.mean(0)
    var = z.var(0, unbiased=False)
    y = (z - mean) / torch.sqrt(var + eps) * w
    return y if b is None else y + b


def bnlstm_definition(model, x, h0, c0):
    """The paper's equations, time-major x (L, N, I); every BN with per-step batch statistics."""
    hs, cs = [], []
    inp = x
    for layer, cell in enumerate(model.cells):
        h, c = h0[layer], c0[layer]
        outs = []
        for t in range(inp.shape[0]):
            gates = (_bn(h @ cell.weight_hh.t(), cell.bn_hh.weight, None, 1e-5)
                     + _bn(inp[t] @ cell.weight_ih.t(), cell.bn_ih.weight, None, 1e-5)
                     + cell.bias)
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(_bn(c, cell.bn_c.weight, cell.bn_c.bias, 1e-5))
            outs.append(h)
        inp = torch.stack(outs)
        hs.append(h)
        cs.append(c)
    return inp, torch.stack(hs), torch.stack(cs)


def _model(**kw):
    torch.manual_seed(0)
    m = batchnorm.BNLSTM(3, 4, **kw).double()
    with torch.no_grad():  # move γ, β off their initial values so they are exercised
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.rand_like(p) * 0.2)
    return m


@pytest.mark.parametrize("batch_first", [False, True])
def test_matches_paper_definition_float64(batch_first):
    m = _model(num_layers=2, batch_first=batch_first, max_length=3)
    x = torch.randn(5, 6, 3, dtype=torch.float64)  # time-major (L=5, N=6, I=3)
    h0 = torch.randn(2, 6, 4, dtype=torch.float64)
    c0 = torch.randn(2, 6, 4, dtype=torch.float64)
    xin = x.transpose(0, 1) if batch_first else x
    out, (h, c) = m(xin, (h0, c0))
    ref_out, ref_h, ref_c = bnlstm_definition(m, x, h0, c0)
    if batch_first:
        ref_out = ref_out.transpose(0, 1)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, ref_h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(c, ref_c, rtol=1e-10, atol=1e-10)
    params = list(m.parameters())
    gy = torch.randn_like(out)
    got = torch.autograd.grad((out * gy).sum() + h.sum(), params)
    want = torch.autograd.grad((ref_out * gy).sum() + ref_h.sum(), params)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


def test_statistics_per_time_step_and_beyond_max_length():
    m = _model(max_length=2)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    m(x)
    bn = m.cells[0].bn_ih
    assert bn.num_batches_tracked.tolist() == [1, 3]  # steps 1, 2, 3 share the last row
    z0 = x[0] @ m.cells[0].weight_ih.t()
    torch.testing.assert_close(bn.running_mean[0], 0.1 * z0.detach().mean(0))
    torch.testing.assert_close(bn.running_var[0], 0.9 + 0.1 * z0.detach().var(0))
    # Eval: step t uses the statistics of min(t, max_length - 1).
    m.eval()
    cell = m.cells[0]
    h, c = cell(x[0], None, time=0)
    h3, _ = cell(x[0], None, time=3)
    h1, _ = cell(x[0], None, time=1)
    assert torch.equal(h3, h1) and not torch.equal(h, h1)


def test_initialisation_follows_the_paper():
    m = batchnorm.BNLSTM(3, 4, num_layers=2)
    for cell in m.cells:
        for bn in (cell.bn_ih, cell.bn_hh, cell.bn_c):
            assert torch.equal(bn.weight, torch.full_like(bn.weight, 0.1))
        assert cell.bn_ih.bias is None and cell.bn_hh.bias is None
        assert torch.equal(cell.bn_c.bias, torch.zeros(4))
        assert torch.equal(cell.bias[4:8], torch.ones(4))  # forget gate
        block = cell.weight_hh[:4]
        torch.testing.assert_close(block @ block.t(), torch.eye(4), atol=1e-5, rtol=0)


def test_lstm_like_interface():
    m = batchnorm.BNLSTM(3, 4, num_layers=2, batch_first=True, max_length=5)
    x = torch.randn(6, 7, 3)
    out, (h, c) = m(x)
    assert out.shape == (6, 7, 4) and h.shape == (2, 6, 4) and c.shape == (2, 6, 4)
    torch.testing.assert_close(out[:, -1], h[-1])
    ref = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True)
    ref_out, (ref_h, _) = ref(x)
    assert ref_out.shape == out.shape and ref_h.shape == h.shape
    # Eval: a prefix gives the prefix of the output, and its final state.
    m.eval()
    whole, _ = m(x)
    first, state = m(x[:, :3])
    torch.testing.assert_close(first, whole[:, :3])
    torch.testing.assert_close(state[0][-1], whole[:, 2])
    # unbatched input (eval; training needs more than one sample per step)
    single, (hs, cs) = m(x[0])
    torch.testing.assert_close(single, whole[0], rtol=1e-5, atol=1e-6)
    assert hs.shape == (2, 4)
    assert state[0].shape == (2, 6, 4)


def test_gradcheck_cell():
    torch.manual_seed(0)
    cell = batchnorm.BNLSTMCell(2, 3, max_length=2).double()
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    h = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, h, c: cell(x, (h, c), 1), (x, h, c))


def test_state_dict_round_trip():
    m = _model(num_layers=2, max_length=3)
    m(torch.randn(4, 5, 3, dtype=torch.float64))
    again = batchnorm.BNLSTM(3, 4, num_layers=2, max_length=3).double()
    again.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert "cells.0.bn_hh.running_mean" in m.state_dict()
    m.eval()
    again.eval()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    assert torch.equal(m(x)[0], again(x)[0])


def test_errors():
    m = batchnorm.BNLSTM(3, 4, num_layers=2)
    with pytest.raises(ValueError, match="input"):
        m(torch.randn(5, 6, 2))
    with pytest.raises(ValueError, match="hx"):
        m(torch.randn(5, 6, 3), (torch.zeros(1, 6, 4), torch.zeros(1, 6, 4)))
    with pytest.raises(TypeError, match="hx"):
        m(torch.randn(5, 6, 3), torch.zeros(2, 6, 4))
    with pytest.raises(ValueError, match="num_layers"):
        batchnorm.BNLSTM(3, 4, num_layers=0)
    with pytest.raises(ValueError, match="max_length"):
        batchnorm.BNLSTM(3, 4, max_length=0)
    with pytest.raises(TypeError, match="input"):
        m([1, 2, 3])
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match="more than 1 value"):
        m(torch.randn(5, 1, 3))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_digits_per_step_statistics_match_inference():
    """What it answers: in a recurrent net the activations' distribution changes with the time
    step, so statistics shared over time (``max_length=1``) are wrong at inference for most
    steps. Digits as sequences of 8 rows: the train/eval output gap with per-step statistics
    is a fraction of the gap with statistics shared across time."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data, dtype=torch.float32).view(-1, 8, 8) / 16

    def gap(max_length):
        torch.manual_seed(0)
        m = batchnorm.BNLSTM(8, 16, batch_first=True, max_length=max_length, momentum=None)
        with torch.no_grad():
            for i in range(0, 1280, 128):  # running statistics: cumulative average
                m(x[i : i + 128])
            test = x[1280:1536]
            train_out, _ = m(test)
            eval_out, _ = m.eval()(test)
        return float((train_out - eval_out).abs().mean())

    per_step, shared = gap(8), gap(1)
    assert per_step < 0.5 * shared, (per_step, shared)
