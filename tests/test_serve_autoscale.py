"""Autoscaling from the spec: a step load takes replicas from min to more than min, and back."""
import os
import socket
import threading
import time

import httpx
import pytest

from meddistill.serve.config import DEPLOYMENT_NAME, serving_args
from meddistill.spec.models import Serving

pytestmark = pytest.mark.slow
APP = "autoscale"
# Short delays and metric windows so the test reacts in seconds, not Ray's production minutes.
FAST = {"upscale_delay_s": 0.5, "downscale_delay_s": 2.0, "metrics_interval_s": 0.5, "look_back_period_s": 1.0}


def _port() -> int:
    if "MEDDISTILL_TEST_SERVE_PORT" not in os.environ:  # shared with test_serve_api in one process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MEDDISTILL_TEST_SERVE_PORT"] = str(s.getsockname()[1])
    return int(os.environ["MEDDISTILL_TEST_SERVE_PORT"])


def _running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        return 0
    return app.deployments[DEPLOYMENT_NAME].replica_states.get("RUNNING", 0)


def _wait_for(predicate, timeout_s: float) -> list[int]:
    seen, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen.append(_running_replicas())
        if predicate(seen[-1]):
            return seen
        time.sleep(0.5)
    return seen


def test_step_load_scales_up_then_down():
    import ray
    from ray import serve

    from meddistill.serve.local import start

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False)
    serving = Serving(min_replicas=1, max_replicas=2, target_ongoing_requests=1, max_ongoing_requests=8,
                      max_batch_size=8, max_model_len=512)
    args = serving_args(serving, "builtin:smollm2-135m-instruct",
                        overrides={"autoscaling_config": FAST, "ray_actor_options": {"num_cpus": 0.5}})
    args["num_threads"] = 1
    url = start(args, port=_port(), name=APP, route_prefix=f"/{APP}")
    try:
        assert _wait_for(lambda n: n == 1, 60)[-1] == 1
        stop = threading.Event()
        codes: list[int] = []

        def load():
            body = {"model": serving.model_name, "messages": [{"role": "user", "content": "Explain asthma."}],
                    "max_tokens": 24}
            while not stop.is_set():
                codes.append(httpx.post(url + "/chat/completions", json=body, timeout=120).status_code)

        workers = [threading.Thread(target=load, daemon=True) for _ in range(8)]
        for w in workers:
            w.start()
        try:
            up = _wait_for(lambda n: n > 1, 120)
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=120)
        assert up[-1] > 1, f"never scaled above min_replicas=1 under 8 concurrent requests: {up}"
        assert 200 in codes
        down = _wait_for(lambda n: n == 1, 120)
        assert down[-1] == 1, f"did not scale back to min_replicas=1 after the load stopped: {down}"
    finally:
        serve.delete(APP)
