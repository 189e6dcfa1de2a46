"""Ctrl-C stops `meddistill run` while it serves, after stages ran in the same process.

Ray Train V2's fit() installs a SIGINT handler in the driver and leaves it there; before
jobs/stage.py restored the previous one, SIGINT during serving only poked a finished training
controller and the command kept serving. The real command, a tiny job, a real SIGINT.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.own_ray, pytest.mark.timeout(20 * 60)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_processes(session: str) -> list[psutil.Process]:
    """Processes of one Ray session (raylet, gcs, workers name the session dir in their arguments)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(session in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_sigint_while_serving_stops_the_command_and_its_ray(tiny_model_dir, tiny_data_refs, tmp_path):
    from tests.pipeline_fixture import tiny_job_document

    small = {"maxSteps": 2, "batchSize": 4, "maxSeqLength": 96, "checkpointEverySteps": 2}
    doc = tiny_job_document(
        str(tiny_model_dir), tiny_data_refs, "./runs", name="sigint",
        teacher={"training": small}, student={"training": small},
        distillation={"teacherCache": "online"},  # one stage fewer; distill still trains with Ray Train
        evaluation={"limit": 2, "batchSize": 2, "maxNewTokens": 2},
        serving={"enabled": True, "minReplicas": 1, "maxReplicas": 1, "maxBatchSize": 2},
    )
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}  # a private Ray for this command
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "meddistill.cli", "run", "job.yaml", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    try:
        deadline = time.time() + 15 * 60
        for line in proc.stdout:  # the banner comes after every stage ran and the app is up
            out.append(line)
            if "MedDistill is serving" in line or time.time() > deadline:
                break
        text = "".join(out)
        assert "MedDistill is serving" in text, f"no serving banner:\n{text[-4000:]}"
        assert "skip " not in text  # every stage ran in this process, trainers included

        log_file = next((tmp_path / "runs" / "sigint" / "logs").glob("run-*.log"))
        session = re.search(r"Ray session logs \(workers, actors\): (\S+)/logs", log_file.read_text()).group(1)
        session = os.path.basename(session)
        assert _session_processes(session), "the serving Ray's processes were not found"

        time.sleep(2)
        stopped = time.time()
        proc.send_signal(signal.SIGINT)  # Ctrl-C, to the command only: it must stop its Ray itself
        rest, _ = proc.communicate(timeout=15)
        took = time.time() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 130), rest[-3000:]
    assert took < 15
    deadline = time.time() + 10  # raylet and gcs exit right after the driver's shutdown
    while _session_processes(session) and time.time() < deadline:
        time.sleep(0.5)
    left = [(p.pid, " ".join(p.cmdline())[:80]) for p in _session_processes(session) if p.is_running()]
    assert not left, f"Ray processes of the run are still there: {left}"
