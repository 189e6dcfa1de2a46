"""Serve on a local Ray: what `meddistill serve` and the end of `meddistill run` call."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from meddistill.serve.args import ActorOptions, ServeArgs
from meddistill.serve.auth import TOKEN_SHA256_ENV, read_token, token_digest
from meddistill.serve.config import APP_NAME, TOKEN_ENV, TOKEN_FILE_ENV, app_args, model_uri_for, serving_args


def start(args: "dict | ServeArgs", *, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME,
          route_prefix: str = "/") -> str:
    """Run the app for `args` on Ray Serve (starting a local Ray if none is up); returns the base URL."""
    import ray
    from ray import serve

    from meddistill.serve.app import build_app

    args = ServeArgs.parse(args)
    if not ray.is_initialized():
        # Ray runs workers at nice 15 by default; a replica answering users must not lose the CPU
        # to every other process on the machine (measured: 5-7x slower under a shared load).
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="auto" if os.environ.get("RAY_ADDRESS") else None, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    if args.require_auth:
        # Replicas read the token from their environment, as a RayService pod gets it from the Secret.
        token = read_token()
        if not token:
            raise RuntimeError(f"serving.auth is set: put the bearer token in ${TOKEN_ENV} (or a file named by "
                               f"${TOKEN_FILE_ENV}) before serving")
        actor = args.deployment.ray_actor_options or ActorOptions()
        # Only its digest reaches the replicas' runtime_env, which Ray shows to whoever reaches its dashboard.
        env = {TOKEN_SHA256_ENV: token_digest(token)}
        actor = actor.model_copy(update={"runtime_env": {**(actor.runtime_env or {}), "env_vars": env}})
        args = args.model_copy(update={"deployment": args.deployment.model_copy(update={"ray_actor_options": actor})})
    serve.run(build_app(args), name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}/v1"


def serve_job(job: Any, *, model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
              blocking: bool = True, base_dir: str | None = None) -> str:
    """Serve a job's quantized student (or `model`, any model source) with the job's serving settings."""
    if model is None:
        model = model_uri_for(job, base_dir)
        if not (Path(model) / "manifest.json").is_file():
            raise FileNotFoundError(
                f"no quantized student at {model} (spec.artifacts.uri + /{job.metadata.name}/quantize): run "
                f"`meddistill run` for this job first, or pass --model SOURCE"
            )
    args = app_args(job, model)
    return _serve(args, host, port, blocking)


def serve_model(model: str, *, serving: Any = None, host: str = "127.0.0.1", port: int = 8000,
                blocking: bool = True) -> str:
    """Serve any model source with default (or given) serving settings."""
    from meddistill.spec.models import Serving

    return _serve(serving_args(serving or Serving(), model), host, port, blocking)


def _serve(args: dict, host: str, port: int, blocking: bool) -> str:
    url = start(args, host=host, port=port)
    print(usage_text(url, args["model_name"], args["require_auth"]), flush=True)
    if not blocking:
        return url
    import ray
    from ray import serve

    # Ctrl-C must reach this loop whatever a library installed before (Ray Train's fit() leaves a
    # handler that only aborts its finished run; jobs/stage.py restores ours, this makes sure).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()  # stops the local Ray this process started; only disconnects from a cluster
    return url


def usage_text(url: str, model_name: str, auth: bool) -> str:
    header = f' -H "Authorization: Bearer ${TOKEN_ENV}"' if auth else ""
    key = f'os.environ["{TOKEN_ENV}"]' if auth else '"none"'
    return f"""MedDistill is serving {model_name!r} at {url}   (Ctrl-C stops it)

  curl {url}/chat/completions -H 'Content-Type: application/json'{header} \\
    -d '{{"model": "{model_name}", "messages": [{{"role": "user", "content": "What is hypertension?"}}]}}'

  curl {url}/medical/answer -H 'Content-Type: application/json'{header} \\
    -d '{{"question": "Which drug is first-line for type 2 diabetes?", "options": {{"A": "Metformin", "B": "Insulin"}}}}'

  from openai import OpenAI
  client = OpenAI(base_url="{url}", api_key={key})
  client.chat.completions.create(model="{model_name}", messages=[{{"role": "user", "content": "What is hypertension?"}}])
"""
