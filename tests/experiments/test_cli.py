"""The ``batchnorm`` command end to end: ``reproduce --quick``, ``info``, ``bench``, bad input."""

from __future__ import annotations

import base64
import json
import re

import pytest

from batchnorm.cli import main
from batchnorm.experiments import CLAIMS, runner
from batchnorm.experiments.result import NOT_SUPPORTED, SUPPORTED, UNAVAILABLE, VERDICTS


def _quick(out, seed):
    assert main(["reproduce", "--quick", "--seed", str(seed), "--out", str(out),
                 "--no-progress"]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_reproduce_quick_holds_across_base_seeds(tmp_path, capsys, digits):
    """Two ``--quick`` runs on disjoint seeds: no verdict may go from supported to not supported
    or back (inconclusive in between is allowed: that is what it is for)."""
    first = _quick(tmp_path / "a", 0)
    printed = capsys.readouterr().out
    second = _quick(tmp_path / "b", 100)
    assert [c["name"] for c in first["claims"]] == list(CLAIMS)
    assert first["run"]["size"] == "quick" and first["run"]["base_seed"] == 0
    flips = []
    for a, b in zip(first["claims"], second["claims"], strict=True):
        assert a["verdict"] in VERDICTS and b["verdict"] in VERDICTS
        if {a["verdict"], b["verdict"]} == {SUPPORTED, NOT_SUPPORTED}:
            flips.append((a["name"], a["reason"], b["reason"]))
        for run, seeds in ((a, [0, 1, 2]), (b, [100, 101, 102])):
            if run["verdict"] == UNAVAILABLE:
                continue
            assert run["metrics"]["seeds"] == seeds  # at least 3 seeds, starting at --seed
            assert all(len(c["values"]) == 3 for c in run["checks"])
    assert not flips, flips
    # the report: per-seed values, intervals, sources, self-contained HTML
    out = tmp_path / "a"
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "## The sources' figures beside ours" in md and "seed 2" in md
    for claim in first["claims"]:
        assert claim["title"] in printed and claim["criterion"] in md
        assert claim["source"]["reported"] in md and claim["agreement"] in md
        for check in claim["checks"]:
            lo, hi = check["interval"]
            assert lo <= min(check["values"]) + 1e-12 or "bootstrap" in check["method"]
        for fig in claim["figures"]:
            png = (out / fig).read_bytes()
            assert png.startswith(b"\x89PNG")
            assert base64.b64encode(png).decode() in html  # self-contained
    assert not re.search(r"src=['\"](?!data:)", html)


@pytest.mark.parametrize("bad", ["/proc/x", "file"])
def test_unwritable_out_is_one_line(tmp_path, capsys, bad):
    if bad == "file":
        (tmp_path / "file").write_text("")
        bad = str(tmp_path / "file" / "sub")  # a folder inside a regular file
    assert main(["reproduce", "--size", "tiny", "--claims", "speed", "--out", bad,
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("batchnorm reproduce: error: --out: cannot write to")


def test_unavailable_component_is_reported(tmp_path, monkeypatch, digits):
    from batchnorm.experiments.claims import recurrent

    def missing(cfg):
        raise ImportError("No module named 'batchnorm.nn.recurrent'")

    monkeypatch.setattr(recurrent, "run", missing)
    (result,) = runner.reproduce(["recurrent"], size="tiny", out=str(tmp_path), progress=False)
    assert result.verdict == UNAVAILABLE and "recurrent" in result.reason
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["claims"][0]["verdict"] == UNAVAILABLE


def test_reproduce_subset_and_seeds(tmp_path, digits):
    results = runner.reproduce(["shift", "speed", "mechanism"], size="tiny", out=str(tmp_path),
                               seeds=3, base_seed=5, progress=False)
    assert [r.name for r in results] == ["shift", "speed", "mechanism"]
    assert len(results[1].metrics["steps_to_target_bn"]) == 3
    assert all(r.metrics["seeds"] == [5, 6, 7] for r in results)
    # claims 1, 2 and 11 share their BN and no-BN runs
    assert results[0].metrics["drift_bn"] == results[2].metrics["drift_bn"]


def test_bad_arguments(tmp_path, capsys):
    assert main(["reproduce", "--claims", "speed,bogus", "--out", str(tmp_path)]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["reproduce", "--data", "cifar", "--out", str(tmp_path)]) == 2
    assert "mnist:PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "--seeds", "0"])
    with pytest.raises(SystemExit):
        main(["reproduce", "--seed", "-1"])
    with pytest.raises(ValueError, match="--seed: expected an int >= 0"):
        runner.reproduce(["speed"], size="tiny", out=str(tmp_path), base_seed=-2)
    assert not (tmp_path / "results.json").exists()


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends available:" in out and "reference" in out
    assert re.search(r"cpu\s+float32\s+channels-first \(N,C,S\)\s+\w+", out)
    assert re.search(r"cpu\s+float16\s+channels-last \(M,C\)\s+\w+", out)


def test_bench_small(capsys, digits):
    assert main(["bench", "--small", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("8x4x5x5")]
    assert any(" torch " in r for r in rows) and any(" reference " in r for r in rows)
