"""The vLLM app keeps our bearer auth and our model sources. vLLM cannot run on these machines, so a
trivial ASGI app stands in for Ray Serve LLM's OpenAI app behind the same middleware, and the
model-source callback runs on a real Ray Serve LLM LLMConfig."""
from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from meddistill import artifacts
from meddistill.serve.auth import TOKEN_SHA256_ENV, token_digest
from meddistill.serve.config import TOKEN_ENV, TOKEN_FILE_ENV
from meddistill.serve.vllm_app import BearerAuth, ResolveModelSource


def stand_in_for_vllm(token: str | None = None) -> TestClient:
    api = FastAPI()

    @api.get("/v1/models")
    def models():
        return {"data": [{"id": "meddistill-student"}]}

    api.add_middleware(BearerAuth, token=token)
    return TestClient(api)


def test_requests_without_the_token_get_401_and_with_it_200():
    client = stand_in_for_vllm("s3cret")
    assert client.get("/v1/models").status_code == 401
    wrong = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).json()["data"][0]["id"] == "meddistill-student"


def test_the_token_comes_from_the_replica_env_and_its_absence_never_opens_the_api(monkeypatch):
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    closed = stand_in_for_vllm().get("/v1/models", headers={"Authorization": "Bearer "})
    assert closed.status_code == 500 and TOKEN_ENV in closed.json()["error"]["message"]
    monkeypatch.setenv(TOKEN_ENV, "from-secret")
    assert stand_in_for_vllm().get("/v1/models", headers={"Authorization": "Bearer from-secret"}).status_code == 200
    # Only the token's digest in the environment (what a Ray cluster's app gets): the token still opens it.
    monkeypatch.delenv(TOKEN_ENV)
    monkeypatch.setenv(TOKEN_SHA256_ENV, token_digest("from-secret"))
    digest_only = stand_in_for_vllm()
    assert digest_only.get("/v1/models", headers={"Authorization": "Bearer from-secret"}).status_code == 200
    assert digest_only.get("/v1/models", headers={"Authorization": f"Bearer {token_digest('from-secret')}"}).status_code == 401


def test_llm_replicas_load_the_model_from_the_resolved_local_dir(tmp_path, monkeypatch):
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    monkeypatch.setenv(artifacts.PVC_ROOT_ENV, str(tmp_path))
    stage = tmp_path / "models" / "job" / "quantize"
    stage.mkdir(parents=True)
    (stage / "config.json").write_text("{}")
    artifacts.write_manifest(stage, stage="quantize", config={})
    config = LLMConfig(model_loading_config={"model_id": "m", "model_source": "pvc://models/job/quantize"},
                       callback_config={"callback_class": ResolveModelSource})
    asyncio.run(ResolveModelSource(config).run_callback("on_before_node_init"))
    assert config.model_loading_config.model_source == str(stage)  # vLLM gets a path it can open

    (stage / "config.json").write_text('{"changed": true}')
    config.model_loading_config.model_source = "pvc://models/job/quantize"
    with pytest.raises(Exception, match="does not match the sha256"):
        asyncio.run(ResolveModelSource(config).run_callback("on_before_node_init"))
