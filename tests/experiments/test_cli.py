"""The ``batchnorm`` command end to end: ``reproduce --quick``, ``info``, ``bench``, bad input."""

from __future__ import annotations

import base64
import json
import re

import pytest

from batchnorm.cli import main
from batchnorm.experiments import CLAIMS, runner
from batchnorm.experiments.result import UNAVAILABLE, VERDICTS


@pytest.mark.slow
def test_reproduce_quick_end_to_end(tmp_path, capsys, digits):
    out = tmp_path / "report"
    assert main(["reproduce", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert [c["name"] for c in data["claims"]] == list(CLAIMS)
    assert data["run"]["size"] == "quick"
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for claim in data["claims"]:
        assert claim["verdict"] in VERDICTS
        assert claim["title"] in printed and claim["criterion"] in md
        for fig in claim["figures"]:
            png = (out / fig).read_bytes()
            assert png.startswith(b"\x89PNG")
            assert base64.b64encode(png).decode() in html  # self-contained
    assert not re.search(r"src=['\"](?!data:)", html)


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
    results = runner.reproduce(["shift", "speed"], size="tiny", out=str(tmp_path), seeds=2,
                               progress=False)
    assert [r.name for r in results] == ["shift", "speed"]
    assert len(results[1].metrics["steps_to_target_bn"]) == 2


def test_bad_arguments(tmp_path, capsys):
    assert main(["reproduce", "--claims", "speed,bogus", "--out", str(tmp_path)]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["reproduce", "--data", "cifar", "--out", str(tmp_path)]) == 2
    assert "mnist:PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "--seeds", "0"])
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
