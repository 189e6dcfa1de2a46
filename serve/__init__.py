"""Serving the student: an OpenAI-compatible Ray Serve app plus a medical QA endpoint.

    config.py    spec.serving -> build_app args, autoscaling, RayService serveConfigV2 (torch/ray-free)
    args.py      `ServeArgs`: build_app's args as one typed model (unknown keys refused)
    app.py       `build_app(args)`: Ray Serve LLM (vLLM) on GPU, else our `MedDistillServer`
    engine.py    CPU/edge engine: step-level continuous batching over one padded KV cache
    protocol.py  request bodies and OpenAI-style error bodies
    metrics.py   time-to-first-token, tokens/s, queue length (beside Ray Serve's own metrics)
    local.py     `serve_job(job)` / `serve_model(source)` on a local Ray (`meddistill serve`)

Import path for `serve run` and RayService: `meddistill.serve.app:build_app`.
"""
