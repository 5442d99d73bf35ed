"""Gradient error of ``save="output"`` against the stored-input path, by ``|γ|`` and dtype.

    python benchmarks/bench_saved_output_numerics.py   # writes results/saved_output_numerics.json

Recovering ``x̂ = (act⁻¹(y) - β [- r]) / γ`` from the output loses what the rounding of ``y``
took away, divided by ``|γ|``. For each dtype (float32, float64), ``|γ|`` from 1e-7 to 10
(every channel the same magnitude, alternating signs), ``β ~ N(0, 1)``, leaky ReLU (0.01), with
and without a residual ``r ~ N(0, 1)``, a (16, 32, 8, 8) batch: the relative errors (max over
elements of ``|a - b|`` over the max of ``|b|``, per gradient) of

- ``vs_input``: the mode against the stored-input path in the same dtype (what a user switching
  sees), and
- ``vs_float64`` for both paths: each against the float64 stored-input result (the truth), so
  that the mode's own error is seen next to the stored-input path's.

Below ``GAMMA_MIN`` both paths are run with the effective weight ``±GAMMA_MIN`` that the mode
computes with (the mode's forward is a different function there, by design). Gradients: ``dx``,
``dγ``, ``dβ`` (and ``dr`` with a residual). Runs on the chosen backend
(``BATCHNORM_BACKEND``, default selection otherwise: the Numba one on the CPU).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batchnorm.functional import batch_norm_impl  # noqa: E402
from batchnorm.kernels import select  # noqa: E402
from batchnorm.ops.saved_output import GAMMA_MIN, effective_weight  # noqa: E402

GAMMAS = [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
SHAPE = (16, 32, 8, 8)
NAMES = ("dx", "dgamma", "dbeta", "dres")


def grads(x, w, b, r, g, save: str) -> list[torch.Tensor]:
    xs = x.clone().requires_grad_()
    ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
    rs = None if r is None else r.clone().requires_grad_()
    y = batch_norm_impl(xs, None, None, ws, bs, True, 0.1, 1e-5, activation="leaky_relu",
                        residual=rs, save=save)
    inputs = [xs, ws, bs] + ([rs] if rs is not None else [])
    return list(torch.autograd.grad(y, inputs, g))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    c = SHAPE[1]
    x64 = torch.randn(SHAPE, generator=gen, dtype=torch.float64) * 3 + 1
    b64 = torch.randn(c, generator=gen, dtype=torch.float64)
    r64 = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    g64 = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(c // 2)
    rows = []
    print(f"backend={select(x64.view(16, 32, 64)).name} (float64); GAMMA_MIN={GAMMA_MIN}")
    print(f"{'dtype':>8} {'res':>4} {'|γ|':>8} " + " ".join(
        f"{n + ' vs_in':>12}" for n in NAMES[:3]) + " " + " ".join(
        f"{n + ' out/in vs f64':>22}" for n in NAMES[1:3]))
    for dtype in (torch.float32, torch.float64):
        for residual in (False, True):
            for gamma in GAMMAS:
                w64 = effective_weight(gamma * signs)
                assert w64 is not None
                r = r64 if residual else None
                truth = grads(x64, w64, b64, r, g64, "input")

                def cast(t, dtype=dtype):
                    return None if t is None else t.to(dtype)

                args = (cast(x64), cast(w64), cast(b64), cast(r), cast(g64))
                stored = grads(*args, "input")
                mode = grads(*args, "output")
                row = {"dtype": str(dtype).replace("torch.", ""), "residual": residual,
                       "gamma": gamma, "clamped": gamma < GAMMA_MIN}
                for name, m, s, t in zip(NAMES, mode, stored, truth, strict=False):
                    row[f"{name}_vs_input"] = rel(m, s)
                    row[f"{name}_output_vs_float64"] = rel(m, t)
                    row[f"{name}_input_vs_float64"] = rel(s, t)
                rows.append(row)
                print(f"{row['dtype']:>8} {str(residual)[0]:>4} {gamma:8.0e} " + " ".join(
                    f"{row[n + '_vs_input']:12.1e}" for n in NAMES[:3]) + " " + " ".join(
                    f"{row[n + '_output_vs_float64']:10.1e} /{row[n + '_input_vs_float64']:10.1e}"
                    for n in NAMES[1:3]))
    # the bound: the mode's error against the stored-input path, as a multiple of u/|γ|
    # (u: the unit roundoff of the dtype), over every |γ| >= GAMMA_MIN
    bound = {}
    for dtype, u in (("float32", 2.0**-24), ("float64", 2.0**-53)):
        for name in NAMES[:3]:
            k = max(r[f"{name}_vs_input"] * max(r["gamma"], GAMMA_MIN) / u for r in rows
                    if r["dtype"] == dtype)
            bound[f"{dtype}_{name}_max_err_times_gamma_over_u"] = k
    print(json.dumps(bound, indent=1))
    out = {"command": "python benchmarks/bench_saved_output_numerics.py",
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                       "torch": torch.__version__},
           "backend": select(x64.view(16, 32, 64)).name, "shape": list(SHAPE),
           "gamma_min": GAMMA_MIN, "bound": bound, "rows": rows,
           "note": "relative error = max |a - b| / max |b| per gradient"}
    path = Path(__file__).parent / "results" / "saved_output_numerics.json"
    path.write_text(json.dumps(out, indent=1, default=lambda v: None if math.isnan(v) else v))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
