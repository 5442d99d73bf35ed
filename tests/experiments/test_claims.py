"""Every experiment at its tiny size: the result's structure, and that its verdict is the one its
own ``judge`` computes from the recorded metrics."""

from __future__ import annotations

import json

import pytest

from batchnorm.experiments import CLAIMS, claim_module
from batchnorm.experiments.report import _jsonable
from batchnorm.experiments.result import VERDICTS, RunConfig, conclude


@pytest.mark.parametrize("name", CLAIMS)
def test_claim_runs_tiny(name, digits):
    module = claim_module(name)
    cfg = RunConfig(digits, "tiny", base_seed=3)
    result = module.run(cfg)
    assert result.name == name == module.NAME
    assert result.verdict in VERDICTS[:3]
    # the verdict is recomputed from the recorded metrics alone, by the claim's own rule
    assert result.checks == module.judge(result.metrics)
    rule = getattr(module, "conclude", conclude)
    assert (result.verdict, result.lean, result.reason) == rule(result.checks)
    seeds = cfg.seed_list(module.PARAMS["tiny"]["seeds"])
    assert seeds == [3, 4] and result.metrics["seeds"] == seeds
    assert all(len(c.values) == len(seeds) for c in result.checks)
    assert result.table[0][1:1 + len(seeds)] == ["seed 3", "seed 4"]
    assert result.criterion == module.CRITERION and result.setup
    assert result.source is module.SOURCE and result.agreement
    assert {"reference", "reported", "url"} <= set(result.source)
    assert result.figures, "every claim draws at least one figure"
    for png in result.figures.values():
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    for table in (result.table, result.detail or [[""]]):
        assert len({len(row) for row in table}) == 1
    assert [row[0] for row in result.table[1:1 + len(result.checks)]] == \
        [c.label for c in result.checks]
    json.dumps(_jsonable(result.to_json()), allow_nan=False)


def test_unknown_claim():
    with pytest.raises(ValueError, match="--claims: expected names from"):
        claim_module("nonsense")


def test_divergence_is_recorded_quietly(digits):
    import warnings

    from batchnorm.experiments.training import mlp, seed_all, train

    seed_all(0)
    model = mlp(digits.features, [32, 32], activation="relu", norm="ours")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NonFiniteBatchWarning may escape
        hist = train(model, digits, steps=50, batch_size=32, lr=1e30, momentum=0.9)
    assert hist.diverged_at is not None and hist.diverged_at <= 50
    assert hist.steps == [hist.diverged_at] and 0.0 <= hist.final <= 0.2
