"""SyncBatchNorm across 2 and 3 Gloo processes on localhost against one-process BatchNorm*d.

Each group is spawned once per module (start-up dominates) and runs every case; the tests below
assert on what each rank recorded (see ``_sync_workers.py``). The distributed code calls the
backend primitives only, so by default the ranks run the reference backend; set
``BATCHNORM_BACKEND`` to run this suite on another one.
"""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist

from tests.distributed import _sync_workers as W

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with Gloo is not available in this build of torch",
)

BACKEND = os.environ.get("BATCHNORM_BACKEND", "reference")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, list[str]]]]:
    out: dict[int, list[dict[str, list[str]]]] = {}
    for world in (2, 3):
        folder = tmp_path_factory.mktemp(f"world{world}")
        out[world] = W.launch(world, "suite", folder, timeout_s=150, backend=BACKEND)
    return out


def _assert_case(runs: dict, world: int, case: str) -> None:
    for rank, record in enumerate(runs[world]):
        assert case in record, f"rank {rank} did not run {case}"
        assert record[case] == [], f"rank {rank}/{world}, {case}:\n" + "\n".join(record[case])


@pytest.mark.parametrize("case", W.numeric_cases(2))
def test_two_ranks_match_one_process(runs, case):
    """Output, dx, dresidual, dγ, dβ, running statistics and eval output, two steps."""
    _assert_case(runs, 2, case)


@pytest.mark.parametrize("case", W.numeric_cases(3))
def test_three_ranks_match_one_process(runs, case):
    """Including a rank with no samples ([5, 0, 3]) and ranks of one sample ([0, 2, 1])."""
    _assert_case(runs, 3, case)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", W.ERROR_CASES)
def test_mismatch_is_an_error_on_every_rank(runs, world, case):
    """Channel count or dtype mismatch, one rank's bad argument, one value in the global batch:
    the same error on every rank, and the group stays usable (the numeric cases run after)."""
    _assert_case(runs, world, case)


def test_ddp_cnn_three_steps_matches_one_process(runs):
    """A converted CNN in DistributedDataParallel, batch [3, 5] on 2 ranks: the same
    parameters and buffers after 3 SGD steps as one process on the whole batch."""
    _assert_case(runs, 2, "ddp")


def test_dead_rank_fails_the_others(tmp_path):
    """A rank that exits makes the others' next collective raise, not hang."""
    results = W.launch(2, "dead_rank", tmp_path, timeout_s=W.PG_TIMEOUT_S + 60, backend=BACKEND)
    for rank, record in enumerate(results):
        assert record["dead-rank"] == [], f"rank {rank}: {record['dead-rank']}"


def test_hung_rank_fails_the_others_after_the_group_timeout(tmp_path):
    """A rank that never joins makes the others raise after the process group's timeout."""
    results = W.launch(2, "hung_rank", tmp_path, timeout_s=60, backend=BACKEND)
    for rank, record in enumerate(results):
        assert record["hung-rank"] == [], f"rank {rank}: {record['hung-rank']}"
