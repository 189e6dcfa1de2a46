"""The gguf student served over HTTP: SmolLM2-135M-Instruct with a LoRA adapter through the real quantize
stage (formats [nf4, gguf]) -> `build_app` with
engine `auto` on a CPU replica (llama.cpp, since gguf was made) on a local Ray Serve, driven by the openai
client: concurrent requests answer as llama.cpp does for each alone, streaming equals the whole answer,
and the bearer token is enforced as for the transformers engine (tests/test_serve_api.py).

Formats [nf4, gguf], so the same artifact also gives the transformers engine's answers to compare with; a
gguf-only artifact (no config.json at its root) starts a replica too (the last test). The real model, not
the tests' tiny random one: that one answers every prompt with the same replacement characters, so equal
answers would prove nothing."""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid

import httpx
import openai
import pytest
from openai import OpenAI

import llama_cpp  # noqa: E402,F401 - a core dependency: missing is a failure, never a skip
pytestmark = pytest.mark.slow  # a 135M quantize stage on Ray and a Serve replica: minutes on 2 shared cores

from meddistill.serve.config import TOKEN_ENV, app_args  # noqa: E402
from tests.test_serve_api import serve_port  # noqa: E402  one Serve HTTP port per test process, shared

NAME = "meddistill-student"
TOKEN = "gguf-token-" + uuid.uuid4().hex[:8]
PROMPTS = [f"Question {i}: is aspirin {'really ' * i}safe in pregnancy?" for i in range(4)]
# Chats on different topics: a chat template around near-identical questions can give one same greedy
# answer to all of them (seen with this student), which would not tell four answers from one cached reply.
CHAT_PROMPTS = ["What is hypertension?", "What causes asthma?", "Is aspirin safe in pregnancy?", "How is diabetes treated?"]


@pytest.fixture(scope="module")
def gguf_job(tiny_data_refs, tmp_path_factory, ray_local):
    """(job, quantize artifact dir): SmolLM2-135M + a LoRA adapter, quantized to nf4 and gguf Q8_0, served with auth, 3 tokens a streamed chunk."""
    from meddistill.jobs.stage import StageContext, run_stage
    from meddistill.modelsource import resolve_model_source
    from meddistill.spec.models import MedDistillJob
    from tests.pipeline_fixture import tiny_job_document, write_distill_artifact

    serving = {"enabled": True, "engine": "auto", "auth": {"secretName": "s"}, "maxModelLen": 512, "maxBatchSize": 4,
               "minReplicas": 1, "maxReplicas": 1, "streamInterval": 3}
    model = resolve_model_source("builtin:smollm2-135m-instruct")  # offline: the GGUF the package ships, converted once
    doc = tiny_job_document(str(model), tiny_data_refs, str(tmp_path_factory.mktemp("runs")), name="gguf-http",
                            quantization={"formats": ["nf4", "gguf"], "ggufType": "Q8_0"}, serving=serving)
    ctx = StageContext(MedDistillJob.model_validate(doc))
    write_distill_artifact(ctx, model, ["q_proj", "v_proj"])
    run_stage(ctx, "quantize")
    return ctx.job, ctx.output_dir("quantize")


@pytest.fixture(scope="module")
def url(gguf_job):
    from ray import serve

    from meddistill.serve.local import start

    job, folder = gguf_job
    # The args exactly as `meddistill serve` / the RayService render them; half a CPU so Serve fits in ray_local's 2.
    args = app_args(job, str(folder), overrides={"ray_actor_options": {"num_cpus": 0.5}})
    assert args["engine"] == "auto" and args["formats"] == ["nf4", "gguf"]
    previous = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = TOKEN  # start() hands it to the replica, as a RayService pod gets it from the Secret
    try:
        yield start(args, port=serve_port(), name="gguf", route_prefix="/gguf")
    finally:
        serve.delete("gguf")
        if previous is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = previous


@pytest.fixture(scope="module")
def client(url):
    return OpenAI(base_url=url, api_key=TOKEN, max_retries=0, timeout=120)


def alone_in_process(gguf_job, prompts: list[str], max_tokens: int, engine_kind: str) -> list[str]:
    """Each prompt's greedy answer from an engine in this process, one request at a time (batch 1):
    llama.cpp on the gguf file, or the transformers engine on the nf4 weights of the same artifact."""
    from meddistill.modelsource import load_model
    from meddistill.serve.args import ServeArgs
    from meddistill.serve.engine import GenerationParams, TransformersEngine
    from meddistill.serve.llamacpp_engine import load_llamacpp_engine

    job, folder = gguf_job
    if engine_kind == "llamacpp":
        engine, tokenizer = load_llamacpp_engine(folder, ServeArgs.parse({**app_args(job, str(folder)), "num_threads": 1}))
    else:
        model, tokenizer = load_model(str(folder), dtype="float32", device="cpu")
        engine = TransformersEngine(model, tokenizer, max_batch_size=1, max_model_len=512, num_threads=1)
    params = GenerationParams(max_tokens=max_tokens, ignore_eos=True)
    try:
        return [asyncio.run(engine.generate(tokenizer(p, add_special_tokens=False).input_ids, params)).text
                for p in prompts]
    finally:
        engine.shutdown()


def test_concurrent_completions_answer_as_the_engine_does_alone(client, gguf_job):
    def complete(prompt):
        return client.completions.create(model=NAME, prompt=prompt, max_tokens=12, extra_body={"ignore_eos": True})

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(complete, PROMPTS))
    assert all(r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length" for r in together)
    answers = [r.choices[0].text for r in together]
    assert answers == alone_in_process(gguf_job, PROMPTS, 12, "llamacpp")
    # Served by llama.cpp from the gguf file, not by the transformers engine from the nf4 weights beside it.
    assert answers != alone_in_process(gguf_job, PROMPTS, 12, "transformers")


def test_concurrent_chats_equal_each_chat_alone_and_streaming_equals_whole(client):
    def chat(prompt, **kw):
        return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=10,
                                              extra_body={"ignore_eos": True}, **kw)

    with concurrent.futures.ThreadPoolExecutor(len(CHAT_PROMPTS)) as pool:
        together = [r.choices[0].message.content for r in pool.map(chat, CHAT_PROMPTS)]
    alone = [chat(p).choices[0].message.content for p in CHAT_PROMPTS]
    assert together == alone and len(set(alone)) > 1  # different prompts, different answers: not one cached reply
    chunks = list(chat(CHAT_PROMPTS[0], stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert 2 <= len(texts) <= 4, texts  # really streamed, 3 tokens a chunk after the first (streamInterval 3)
    assert "".join(texts) == alone[0]
    assert chunks[-1].usage.completion_tokens == 10


def test_bearer_token_is_required(url):
    assert httpx.get(url + "/models", timeout=30).status_code == 401
    r = httpx.get(url + "/models", headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=url, api_key="wrong", max_retries=0).chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    ok = httpx.get(url + "/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert ok.status_code == 200 and [m["id"] for m in ok.json()["data"]] == [NAME]
    assert ok.json()["data"][0]["max_model_len"] == 512  # the gguf engine's context, from serving.maxModelLen



def test_a_gguf_only_artifact_is_served(gguf_job, tmp_path):
    """formats [gguf] alone: the artifact folder has no transformers config.json at its root, only gguf/."""
    import shutil

    from ray import serve

    from meddistill.serve.local import start

    job, folder = gguf_job
    only = tmp_path / "quantize"
    shutil.copytree(folder / "gguf", only / "gguf")
    assert not (only / "config.json").exists()
    args = {**app_args(job, str(only), overrides={"ray_actor_options": {"num_cpus": 0.5}}), "formats": ["gguf"],
            "require_auth": False}
    try:
        base = start(args, port=serve_port(), name="gguf-only", route_prefix="/gguf-only")
        r = httpx.post(base + "/completions", json={"model": NAME, "prompt": PROMPTS[0], "max_tokens": 4,
                                                    "ignore_eos": True}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    finally:
        serve.delete("gguf-only")
