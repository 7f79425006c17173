"""tracking.RunLogger: rank 0's MLflow records go out from a thread; a server that is down
costs the training thread nothing and ends in one warning with the count of what was lost."""

from __future__ import annotations

import time

from mlflow.tracking import MlflowClient

from medgpt import tracking
from medgpt.testing import free_port


def test_records_arrive_in_order(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = tracking.start_or_resume_run(uri, "e", "r", {}, {})
    logger = tracking.RunLogger(uri, run_id)
    for step in range(1, 51):
        logger.metrics({"loss": 10.0 / step, "lr": 1e-3, "nan": float("nan")}, step)
    logger.text("hello", "samples/a.txt")
    assert logger.close(30) == 0
    hist = MlflowClient(uri).get_metric_history(run_id, "loss")
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == list(range(1, 51))
    assert MlflowClient(uri).get_metric_history(run_id, "nan") == []  # not finite: not sent
    assert logger.sent == 50 * 2 + 1


def test_a_dead_server_never_blocks_and_is_counted_once() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    lines: list[str] = []
    logger = tracking.RunLogger(uri, "0" * 32, max_pending=30, log=lines.append)
    t0 = time.perf_counter()
    for step in range(20):
        logger.metrics({"loss": 1.0, "lr": 2.0}, step)  # 40 records, over the cap of 30
    queued_s = time.perf_counter() - t0
    assert queued_s < 0.5, f"queueing took {queued_s:.2f} s: the training thread waited"
    assert not logger.flush(1.0)
    left = logger.close(2.0)
    assert left == 40
    assert logger.dropped == 10
    assert sum("is not answering" in line for line in lines) == 1, lines
    assert lines[-1] == (
        f"medgpt: warning: 40 MLflow record(s) of run {'0' * 32} were not delivered to {uri} "
        "(server unreachable); the checkpoints are unaffected"
    )
