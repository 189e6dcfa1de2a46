"""`meddistill run`'s progress display: one line per stage.

    teacher       ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━  6/8 steps  loss 1.23  ETA 0:00:21  0:01:05
    distill-data  ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━  running                          0:00:12

Training stages' rank 0 appends one JSON line per optimizer step to `<artifact dir>/progress.jsonl`
(jobs/train_common.py); a thread polls that file every second. Stages without steps show a
pulsing bar and the elapsed time.
"""
from __future__ import annotations

import datetime
import json
import threading
from pathlib import Path

POLL_S = 1.0


def read_progress(path: Path, since: float) -> dict | None:
    """{step, total, loss, eta_s} from the lines written since `since` (eta_s None until two steps)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    lines = []
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:  # a line the worker is still writing
            continue
        if line.get("time", 0) >= since:
            lines.append(line)
    if not lines:
        return None
    first, last = lines[0], lines[-1]
    eta = None
    if last["step"] > first["step"]:
        # Rate over this run's steps only: the first step also paid for loading the model.
        per_step = (last["time"] - first["time"]) / (last["step"] - first["step"])
        eta = per_step * max(0, last["total"] - last["step"])
    return {"step": last["step"], "total": last["total"], "loss": last.get("loss"), "eta_s": eta}


def progress_text(p: dict) -> str:
    """`6/8 steps  loss 1.23  ETA 0:00:21`."""
    parts = [f"{p['step']}/{p['total']} steps" if p["total"] else f"step {p['step']}"]
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.2f}")
    eta = "?" if p.get("eta_s") is None else str(datetime.timedelta(seconds=round(p["eta_s"])))
    parts.append(f"ETA {eta}")
    return "  ".join(parts)


class StageBars:
    """The rich Progress with one task per stage, and the poller of the running stage."""

    def __init__(self, console, stages: list[str]):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        width = max(len(s) for s in stages)
        self.progress = Progress(
            SpinnerColumn(finished_text="✓"), TextColumn(f"[bold]{{task.description:<{width}}}"), BarColumn(),
            TextColumn("{task.fields[state]}"), TimeElapsedColumn(), console=console, transient=False,
        )
        self.tasks = {s: self.progress.add_task(s, total=1, start=False, state="pending") for s in stages}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self._stop_polling()
        return self.progress.__exit__(*exc)

    def skipped(self, stage: str, state: str) -> None:
        self.progress.start_task(self.tasks[stage])  # rich marks only started tasks finished
        self.progress.update(self.tasks[stage], total=1, completed=1, state=state)

    def running(self, stage: str, progress_file: Path, since: float) -> None:
        task = self.tasks[stage]
        self.progress.start_task(task)
        self.progress.update(task, total=None, state="running")  # pulsing until steps are reported
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, args=(task, Path(progress_file), since, self._stop),
                                        name=f"progress-{stage}", daemon=True)
        self._poller.start()

    def finished(self, stage: str, state: str, ok: bool = True) -> None:
        self._stop_polling()
        task = self.tasks[stage]
        if ok:
            self.progress.update(task, total=1, completed=1, state=state)
        else:
            self.progress.update(task, state=state)
        self.progress.stop_task(task)

    def _stop_polling(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
            self._poller = None

    def _poll(self, task, path: Path, since: float, stop: threading.Event) -> None:
        while not stop.wait(POLL_S):
            p = read_progress(path, since)
            if p is not None:
                self.progress.update(task, total=p["total"] or None, completed=p["step"], state=progress_text(p))
