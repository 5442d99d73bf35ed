"""torch.compile(fullgraph=True) on every variant: one graph, no break, same numbers as eager.

Compilation is slow on a 2-core machine, so the variants share compiled graphs: one small model
holds the BN-like layers, one the BN-LSTM. ``aot_eager`` traces through Dynamo *and* AOTAutograd
(fake kernels, functionalization of the running-statistics mutation, the backward graph); a
graph break fails ``fullgraph=True`` in either.
"""

from __future__ import annotations

import copy

import torch

import batchnorm


class _AllLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.renorm = batchnorm.BatchRenorm2d(3, warmup_steps=4)
        self.ghost = batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2)
        self.frozen = batchnorm.FrozenBatchNorm2d(3)
        self.masked = batchnorm.MaskedBatchNorm1d(3)
        self.virtual = batchnorm.VirtualBatchNorm1d(3)

    def forward(self, x, mask, seq):
        y = self.frozen(self.ghost(self.renorm(x)))  # ghost: virtual batches of 2 and 3
        z = self.masked(seq, mask)
        v = self.virtual(y.mean((2, 3)))
        return y, z, v


def test_layers_compile_fullgraph_and_match_eager():
    torch._dynamo.reset()
    eager = _AllLayers()
    eager.virtual.set_reference(torch.randn(6, 3))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 3, 2, 2)
    seq = torch.randn(4, 3, 6)
    mask = torch.arange(6) < torch.tensor([6, 4, 2, 1]).unsqueeze(1)
    for _ in range(2):
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_e, out_c = eager(xe, mask, seq), compiled(xc, mask, seq)
        for a, b in zip(out_e, out_c, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        sum(o.sum() for o in out_e).backward()
        sum(o.sum() for o in out_c).backward()
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)
    state_e, state_c = eager.state_dict(), compiled_model.state_dict()
    for k in state_e:
        torch.testing.assert_close(state_c[k], state_e[k], msg=k)
    assert int(compiled_model.renorm.num_batches_tracked) == 2
    assert int(compiled_model.masked.num_batches_tracked) == 2


def test_bnlstm_compiles_fullgraph():
    torch._dynamo.reset()
    eager = batchnorm.BNLSTM(2, 3, max_length=2, batch_first=True)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 2)
    out_e, (h_e, _) = eager(x)
    out_c, (h_c, _) = compiled(x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_c, h_e, rtol=1e-5, atol=1e-5)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(compiled_model.state_dict()[k], v, msg=k)


def test_renorm_inductor():
    """One layer through the default (Inductor) backend as well."""
    torch._dynamo.reset()
    eager = batchnorm.BatchRenorm1d(4, warmup_steps=0)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(6, 4)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_model.running_var, eager.running_var)
