"""`meddistill run`'s progress line: what the training workers append, read back as step, loss, ETA."""
from __future__ import annotations

import json
import time

from meddistill.cli.run_progress import progress_text, read_progress
from meddistill.jobs.train_common import append_progress


def test_workers_lines_read_back_as_step_loss_and_eta(tmp_path):
    path = tmp_path / "progress.jsonl"
    since = time.time()
    append_progress(path, 8, {"step": 1, "loss": 2.5, "resumed_from_step": 0})
    assert read_progress(path, since) == {"step": 1, "total": 8, "loss": 2.5, "eta_s": None}  # no rate yet
    append_progress(path, 8, {"step": 2, "loss": 1.234})
    p = read_progress(path, since)
    assert (p["step"], p["total"], p["loss"]) == (2, 8, 1.234) and p["eta_s"] >= 0
    assert progress_text(p).startswith("2/8 steps  loss 1.23  ETA 0:00:")


def test_eta_uses_this_runs_steps_only(tmp_path):
    path = tmp_path / "progress.jsonl"
    lines = [  # an interrupted run's steps (an hour ago), then this run's: 10 s per step from step 4
        {"step": 1, "total": 10, "loss": 3.0, "time": 100.0},
        {"step": 4, "total": 10, "loss": 2.0, "time": 5000.0},
        {"step": 6, "total": 10, "loss": 1.5, "time": 5020.0},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 7, "tot')  # a half-written line
    p = read_progress(path, since=4000.0)
    assert p == {"step": 6, "total": 10, "loss": 1.5, "eta_s": 40.0}
    assert progress_text(p) == "6/10 steps  loss 1.50  ETA 0:00:40"
    assert read_progress(path, since=6000.0) is None and read_progress(tmp_path / "missing", 0) is None
