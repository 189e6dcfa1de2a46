"""The vLLM engine's app: Ray Serve LLM's OpenAI app with our bearer auth and our model sources.

Ray Serve LLM's `build_openai_app` has no token check and resolves model sources its own way
(`s3://` mirrored without our manifest check, `pvc://` not at all). So the app is composed from its
public pieces (`build_llm_deployment`, `OpenAiIngress`, `make_fastapi_ingress`) on Ray Serve LLM's
own FastAPI app (its OpenAI error bodies, request ids and metrics) with two additions:
- `BearerAuth`, an ASGI middleware: 401 without `Authorization: Bearer <token>` when serving.auth
  is set (the token is read in the ingress replica, from the same env as our transformers app);
- `ResolveModelSource`, a Ray Serve LLM callback that runs in each LLM replica before the engine
  starts and points vLLM at `model_source.local_model_dir(...)`, as the transformers engine does
  (the artifact is fetched and checked whole; vLLM gets its w4a16/ folder when the job made that format).
Prompts reach vLLM's log only with serving.logPrompts (`enable_log_requests`, see config.llm_config).
"""
from __future__ import annotations

import json
import logging

from meddistill.serve.args import ServeArgs
from meddistill.serve.auth import MISSING, authorized, expected_digest, token_digest

log = logging.getLogger("ray.serve").getChild("meddistill")
UNAUTHORIZED = json.dumps({"error": {
    "message": "missing or wrong bearer token: send the header 'Authorization: Bearer <token>'",
    "type": "authentication_error", "param": None, "code": "invalid_api_key"}}).encode()


class BearerAuth:
    """ASGI middleware: HTTP requests need `Authorization: Bearer <token>`, else 401 (OpenAI's body).

    `token` None reads it from the replica's environment on first use (auth.expected_digest); a replica
    with auth on and no token answers 500 with the fix, never serves unauthenticated.
    """

    def __init__(self, app, token: str | None = None):
        self.app, self._digest = app, (token_digest(token) if token else None)

    def digest(self) -> str:
        if self._digest is None:
            self._digest = expected_digest() or ""
        return self._digest

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan events carry no headers
            return await self.app(scope, receive, send)
        expected = self.digest()
        if not expected:
            return await _respond(send, 500, json.dumps({"error": {
                "message": MISSING, "type": "server_error", "param": None, "code": "auth_not_configured"}}).encode())
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        if not authorized(header, expected):
            return await _respond(send, 401, UNAUTHORIZED)
        return await self.app(scope, receive, send)


async def _respond(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _callback_base():
    from ray.llm._internal.common.callbacks.base import CallbackBase  # the type LLMConfig.callback_config takes

    return CallbackBase


class ResolveModelSource(_callback_base()):
    """Runs in each LLM replica before vLLM starts: the model from model_source.local_model_dir, or
    its `subfolder` (callback_kwargs; config.llm_config sets w4a16 there)."""

    async def on_before_node_init(self) -> None:
        from meddistill.serve.model_source import ModelArtifactError, local_model_dir

        config = self.llm_config
        source = config.model_loading_config.model_source
        path = local_model_dir(source)
        if self.kwargs.get("subfolder"):
            path = path / self.kwargs["subfolder"]
            if not (path / "config.json").is_file():
                raise ModelArtifactError(
                    f"model source {source}: no {self.kwargs['subfolder']}/config.json in the artifact, so the quantize "
                    f"stage did not make the {self.kwargs['subfolder']} format; re-run it with that format in "
                    f"quantization.formats")
        log.info("engine vllm: %s from %s", source, path)
        config.model_loading_config.model_source = str(path)
        # Ray Serve LLM caches the engine config (with the remote source) before this hook: rebuild
        # it from the local path, so it neither downloads again nor loads the raw URI.
        config._engine_config = None


def vllm_llm_config(args: "ServeArgs | dict"):
    """The LLMConfig of the args' `llm_config`, with ResolveModelSource as its callback (keeping the
    callback kwargs the config rendered: the w4a16 subfolder)."""
    # ray.serve.llm's LLMConfig is this class under a public name, but importing that module needs vllm.
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    rendered = ServeArgs.parse(args).llm_config.model_dump(exclude_none=True)
    callback = {**rendered.get("callback_config", {}), "callback_class": ResolveModelSource}
    return LLMConfig(**{**rendered, "callback_config": callback})


def build_vllm_app(args: ServeArgs):
    """The Serve application for the vLLM engine (args from config.app_args, `llm_config` included)."""
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import init as ray_llm_fastapi_app
    from ray.serve.llm import build_llm_deployment
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

    config = vllm_llm_config(args)
    api = ray_llm_fastapi_app()
    if args.require_auth:
        api.add_middleware(BearerAuth)  # added last, so it runs first
    ingress = make_fastapi_ingress(OpenAiIngress, app=api)
    return serve.deployment(ingress, **OpenAiIngress.get_deployment_options([config])).bind(
        llm_deployments={config.model_id: build_llm_deployment(config)},
        model_cards={config.model_id: to_model_metadata(config.model_id, config)},
    )
