"""The README's main command for real: `meddistill run examples/quickstart.yaml`, the console script a
user types, on the quickstart file itself with fewer steps and questions (the full file runs once per CI
through the operator, tests/test_e2e_ray.py). Every stage runs; it prints the paper's table and a model
card; it serves the 4-bit student, which answers the README's question through the openai client; Ctrl-C
stops it. A test fails here when the first thing a new user runs stops doing any of that."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from meddistill.artifacts import verify
from tests.support.kube_cluster import free_port

pytestmark = [pytest.mark.slow, pytest.mark.own_ray, pytest.mark.timeout(40 * 60)]

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("teacher", "distill-data", "distill", "quantize", "evaluate")


def readme_main_command() -> str:
    """The `meddistill ...` part of the README's main-command block (its install step already ran)."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- main-command -->\s*```bash\n(.*?)```", readme, re.S).group(1)
    command = next(part.strip() for line in block.splitlines() for part in line.split("&&") if "meddistill " in part)
    assert command == "meddistill run examples/quickstart.yaml", command
    return command


def smaller_quickstart(folder: Path) -> None:
    """examples/quickstart.yaml with 2 teacher and 4 student steps, 1 replica, and evaluation made cheap:
    8 PubMedQA questions for the 16-bit and the 4-bit student (the paper's comparison), without the open
    general questions (up to 96 new tokens each, for four models: most of the time on 2 cores)."""
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec = doc["spec"]
    spec["teacher"]["training"].update(maxSteps=2, checkpointEverySteps=2, maxSamples=16)
    spec["student"]["training"].update(maxSteps=4, checkpointEverySteps=4, maxSamples=16)
    spec["evaluation"].update(limit=8, latencyQuestions=1, models=["student", "quantized"],
                              datasets=[d for d in spec["evaluation"]["datasets"] if d.startswith("pubmedqa:")])
    spec["serving"].update(minReplicas=1, maxReplicas=1)
    (folder / "examples").mkdir()
    (folder / "examples" / "quickstart.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def test_the_readme_main_command_trains_prints_the_table_and_serves_an_answer(tmp_path):
    from openai import OpenAI

    argv = readme_main_command().split()
    smaller_quickstart(tmp_path)
    console_script = Path(sys.executable).parent / argv[0]  # the entry point pip installed, as typed
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([str(console_script), *argv[1:], "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    try:
        deadline = time.time() + 30 * 60
        for line in proc.stdout:
            out.append(line)
            if "MedDistill is serving" in line or time.time() > deadline:
                break
        text = "".join(out)
        assert "MedDistill is serving" in text, f"no serving banner:\n{text[-5000:]}"
        served = re.search(r"MedDistill is serving '([^']+)' at (\S+)", text)
        model, url = served.group(1), served.group(2)

        # The paper's table and the model card, as printed before serving.
        assert "results (the paper's table)" in text and "Paper's comparison (quantized vs" in text, text[-5000:]
        for kind in ("student", "quantized"):
            assert re.search(rf"[│|] {kind}\s", text), f"no {kind} row in the printed table"  # rich: ASCII without UTF-8
        job_dir = tmp_path / "runs" / "quickstart"
        for stage in STAGES:
            assert verify(job_dir / stage) is not None, f"{stage}: no verified artifact"
        assert "model card: " in text and (job_dir / "evaluate" / "README.md").is_file()

        # The served model is the 4-bit student, and it answers the README's question in words.
        client = OpenAI(base_url=url, api_key="none", timeout=120, max_retries=0)
        assert [m.id for m in client.models.list().data] == [model]
        reply = client.chat.completions.create(model=model, max_tokens=32,
                                               messages=[{"role": "user", "content": "What is hypertension?"}])
        answer = reply.choices[0].message.content
        print(f"\n[readme main command] What is hypertension? -> {answer!r}", file=sys.stderr)
        assert len(answer.split()) >= 3, answer
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C, as the banner says
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode in (0, 130), "".join(out)[-3000:]
