"""`meddistill serve --model SOURCE` as a user runs it: prints the URL, answers, stops on Ctrl-C."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_meddistill_serve_model_prints_url_answers_and_stops_on_ctrl_c():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own local Ray, never one running on this machine
    proc = subprocess.Popen(
        [sys.executable, "-m", "meddistill.cli", "serve", "--model", "builtin:smollm2-135m-instruct",
         "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    url, lines = f"http://127.0.0.1:{port}/v1", []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "from openai import OpenAI" in line:
                break
        output = "".join(lines)
        assert f"serving 'meddistill-student' at {url}" in output, output[-3000:]
        assert f"curl {url}/chat/completions" in output
        reply = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120).chat.completions.create(
            model="meddistill-student", messages=[{"role": "user", "content": "What is a fever?"}], max_tokens=6)
        assert reply.usage.completion_tokens > 0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert rc == 0
