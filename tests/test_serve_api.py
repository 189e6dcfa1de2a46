"""The real app on a local Ray Serve with SmolLM2-135M-Instruct, driven by the openai client.

Two apps share one Ray instance: `open` (no auth, prompts not logged) and `secure` (bearer token,
prompts logged, tiny capacity so backpressure shows).
"""
import concurrent.futures
import glob
import os
import socket
import uuid

import httpx
import openai
import pytest
from openai import OpenAI

from meddistill.serve.config import TOKEN_ENV, serving_args
from meddistill.spec.models import Serving

MODEL = "builtin:smollm2-135m-instruct"
NAME = "meddistill-student"
TOKEN = "test-token-" + uuid.uuid4().hex[:8]
pytestmark = pytest.mark.slow


def serve_port() -> int:
    """One HTTP port per test process (Serve's proxy is started once per Ray instance)."""
    if "MEDDISTILL_TEST_SERVE_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MEDDISTILL_TEST_SERVE_PORT"] = str(s.getsockname()[1])
    return int(os.environ["MEDDISTILL_TEST_SERVE_PORT"])


def start_app(name: str, serving: Serving, **extra) -> str:
    import ray

    from meddistill.serve.local import start

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False)  # logical CPUs: several 0.5-CPU replicas on 2 cores
    args = serving_args(serving, MODEL, overrides={"ray_actor_options": {"num_cpus": 0.5}})
    args.update(num_threads=1, **extra)
    return start(args, port=serve_port(), name=name, route_prefix=f"/{name}")


@pytest.fixture(scope="module")
def urls():
    from ray import serve

    os.environ[TOKEN_ENV] = TOKEN
    open_url = start_app("open", Serving(max_model_len=512))
    secure_url = start_app("secure", Serving(max_model_len=512, auth={"secretName": "s"}, log_prompts=True,
                                             max_ongoing_requests=3, max_batch_size=1, target_ongoing_requests=1,
                                             stream_interval=4),
                           max_waiting=1)
    yield {"open": open_url, "secure": secure_url}
    serve.delete("open")
    serve.delete("secure")


@pytest.fixture(scope="module")
def client(urls):
    return OpenAI(base_url=urls["open"], api_key="unused", max_retries=0, timeout=120)


def ask(content):
    return [{"role": "user", "content": content}]


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_chat_completion_with_usage(client):
    r = client.chat.completions.create(model=NAME, messages=ask("What is hypertension?"), max_tokens=12)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("length", "stop")
    assert 0 < r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion(client):
    r = client.completions.create(model=NAME, prompt="The normal human body temperature is", max_tokens=8)
    assert r.choices[0].text.strip() and r.usage.completion_tokens <= 8


def test_streaming_chat_equals_the_whole_answer(client):
    whole = client.chat.completions.create(model=NAME, messages=ask("Name a symptom of the flu."), max_tokens=16)
    stream = client.chat.completions.create(model=NAME, messages=ask("Name a symptom of the flu."), max_tokens=16,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices]) > 2  # really streamed, not one blob
    assert text == whole.choices[0].message.content  # greedy: the same tokens either way
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streaming_completion(client):
    parts = [c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="Aspirin is", max_tokens=8, stream=True)]
    assert len(parts) > 1 and "".join(parts).strip()


def test_medical_endpoint_returns_the_parsed_answer(urls):
    body = {"question": "Which drug is first-line therapy for type 2 diabetes?",
            "options": {"A": "Metformin", "B": "Insulin glargine", "C": "Aspirin", "D": "Warfarin"},
            "max_tokens": 16}
    r = httpx.post(urls["open"] + "/medical/answer", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["question_type"] == "multiple_choice"  # detected from the options
    assert out["answer"] in {"A", "B", "C", "D"}, out  # the parser read a letter out of the text
    assert out["answer"] in out["final_text"] and out["text"].strip()
    assert out["usage"]["completion_tokens"] > 0


def test_medical_endpoint_yes_no_with_context(urls):
    body = {"question": "Does regular exercise lower blood pressure?", "max_tokens": 12,
            "context": "In a trial of 300 adults, 12 weeks of aerobic exercise lowered systolic pressure by 5 mmHg."}
    out = httpx.post(urls["open"] + "/medical/answer", json=body, timeout=120).json()
    assert out["question_type"] == "yes_no_maybe"
    assert out["answer"] in {"yes", "no", "maybe"} or out["parse_note"], out


@pytest.mark.parametrize("kwargs,status,param,code", [
    ({"model": "gpt-4", "messages": ask("hi")}, 404, "model", "model_not_found"),
    ({"model": NAME, "messages": ask("hi"), "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"model": NAME, "messages": ask("hi"), "max_tokens": 100000}, 400, "max_tokens", "invalid_value"),
    ({"model": NAME, "messages": ask("fever " * 600)}, 400, "messages", "context_length_exceeded"),
    ({"model": NAME, "messages": ask("x " * 300), "max_tokens": 400}, 400, "messages", "context_length_exceeded"),
    ({"model": NAME, "messages": []}, 400, "messages", "invalid_value"),
])
def test_bad_input_gets_an_openai_style_4xx(client, kwargs, status, param, code):
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(**kwargs)
    assert err.value.status_code == status
    error = err.value.body  # the openai client unwraps {"error": {...}}
    assert error["param"] == param and error["code"] == code and error["message"]


def test_malformed_json_is_a_400(urls):
    r = httpx.post(urls["open"] + "/chat/completions", content=b'{"model": ', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_auth_off_needs_no_token(urls):
    assert httpx.get(urls["open"] + "/models", timeout=30).status_code == 200


def test_auth_on_refuses_without_or_with_a_wrong_token(urls):
    url = urls["secure"]
    assert httpx.get(url + "/models", timeout=30).status_code == 401
    r = httpx.get(url + "/models", headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=url, api_key="wrong", max_retries=0).chat.completions.create(model=NAME, messages=ask("x"))
    ok = OpenAI(base_url=url, api_key=TOKEN, max_retries=0, timeout=120)
    assert ok.chat.completions.create(model=NAME, messages=ask("hi"), max_tokens=4).usage.completion_tokens > 0


def test_over_capacity_answers_fast_429_or_503_and_keeps_serving(urls):
    url, headers = urls["secure"] + "/chat/completions", {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": NAME, "messages": ask("Explain the circulatory system."), "max_tokens": 24}

    def post(_):
        r = httpx.post(url, json=body, headers=headers, timeout=180)
        return r.status_code, r.elapsed.total_seconds()

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(post, range(12)))
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 429, 503}, codes
    assert 200 in codes and (429 in codes or 503 in codes), codes
    slowest_ok = max(t for c, t in results if c == 200)
    assert all(t < slowest_ok for c, t in results if c != 200), results  # refusals do not wait for a slot
    after = httpx.post(url, json={**body, "max_tokens": 2}, headers=headers, timeout=180)
    assert after.status_code == 200  # no crash: the replica still serves


def _all_ray_logs() -> str:
    """Every log file of this Ray session: replica logs and the workers' stdout/stderr."""
    import ray

    logs_dir = ray._private.worker._global_node.get_logs_dir_path()
    text = ""
    for path in glob.glob(os.path.join(logs_dir, "**", "*.*"), recursive=True):
        with open(path, errors="replace") as f:
            text += f.read()
    return text


def test_prompts_are_logged_only_when_log_prompts(urls, client):
    quiet, loud = "quietmarker" + uuid.uuid4().hex[:6], "loudmarker" + uuid.uuid4().hex[:6]
    client.chat.completions.create(model=NAME, messages=ask(f"Spell {quiet}"), max_tokens=2)
    OpenAI(base_url=urls["secure"], api_key=TOKEN, max_retries=0, timeout=120).chat.completions.create(
        model=NAME, messages=ask(f"Spell {loud}"), max_tokens=2)
    import time

    for _ in range(20):  # log files are flushed asynchronously
        logs = _all_ray_logs()
        if loud in logs:
            break
        time.sleep(0.5)
    assert loud in logs and quiet not in logs


def test_stream_interval_reaches_the_replicas_engine(urls):
    """serving.streamInterval 4 on the `secure` app: after the first token, text comes 4 tokens a chunk."""
    c = OpenAI(base_url=urls["secure"], api_key=TOKEN, max_retries=0, timeout=120)
    kw = {"model": NAME, "messages": ask("What is hypertension?"), "max_tokens": 13, "extra_body": {"ignore_eos": True}}
    whole = c.chat.completions.create(**kw).choices[0].message.content
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert "".join(texts) == whole and chunks[-1].usage.completion_tokens == 13
    assert 2 <= len(texts) <= 4, texts  # 1 + 4 + 4 + 4 tokens; one chunk per token would be 13
