"""The continuous-batching engine on the real SmolLM2-135M-Instruct: joins, leaves, limits."""
import asyncio

import pytest
import torch

from meddistill.modelsource import load_model
from meddistill.serve.engine import EngineOverloaded, GenerationParams, RequestTooLong, TransformersEngine

QUESTIONS = ["What is hypertension?", "Name one symptom of influenza.",
             "A 45-year-old man has crushing chest pain radiating to the left arm. What is the most likely diagnosis?",
             "Is aspirin an anticoagulant?"]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_model("builtin:smollm2-135m-instruct")


@pytest.fixture()
def engine(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    eng = TransformersEngine(model, tokenizer, max_batch_size=4, max_model_len=256, max_waiting=8)
    yield eng
    eng.shutdown()


def _prompt_ids(tokenizer, question):
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def _alone(model, tokenizer, ids, n):
    """Greedy continuation of one unpadded prompt: what every batched row must reproduce."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_requests_joining_and_leaving_mid_batch_get_their_own_greedy_answer(engine, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [_prompt_ids(tokenizer, q) for q in QUESTIONS]
    lengths = [12, 6, 16, 9]  # rows finish at different steps, so others leave while some continue

    async def late(i, delay):
        await asyncio.sleep(delay)  # later requests join a batch that is already decoding
        return await engine.generate(prompts[i], GenerationParams(max_tokens=lengths[i]))

    async def run():
        return await asyncio.gather(*(late(i, 0.4 * i) for i in range(len(prompts))))

    results = asyncio.run(run())
    for i, result in enumerate(results):
        expected = _alone(model, tokenizer, prompts[i], lengths[i])
        assert result.text == expected, f"row {i}: {result.text!r} != {expected!r}"
        assert result.completion_tokens <= lengths[i] and result.prompt_tokens == len(prompts[i])
    assert engine.running == 0 and engine.queue_length == 0


def test_full_waiting_queue_refuses_instead_of_growing(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    eng = TransformersEngine(model, tokenizer, max_batch_size=1, max_model_len=256, max_waiting=1)
    ids = _prompt_ids(tokenizer, QUESTIONS[0])

    async def run():
        outcomes = await asyncio.gather(*(eng.generate(ids, GenerationParams(max_tokens=8)) for _ in range(6)),
                                        return_exceptions=True)
        return outcomes

    try:
        outcomes = asyncio.run(run())
    finally:
        eng.shutdown()
    refused = [o for o in outcomes if isinstance(o, EngineOverloaded)]
    served = [o for o in outcomes if not isinstance(o, BaseException)]
    assert refused and served and len(refused) + len(served) == 6


def test_prompt_longer_than_context_is_refused(engine, model_and_tokenizer):
    with pytest.raises(RequestTooLong, match="context of 256"):
        asyncio.run(engine.generate(list(range(200)), GenerationParams(max_tokens=100)))


def test_stop_string_ends_the_text_before_it(engine, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    ids = _prompt_ids(tokenizer, "Count from 1 to 10 separated by commas.")
    full = asyncio.run(engine.generate(ids, GenerationParams(max_tokens=24)))
    stop = full.text.strip()[4:6]  # a piece from inside the answer
    cut = asyncio.run(engine.generate(ids, GenerationParams(max_tokens=24, stop=(stop,))))
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.text.startswith(cut.text)


def test_client_that_goes_away_frees_its_row(engine, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    ids = _prompt_ids(tokenizer, QUESTIONS[0])

    async def run():
        stream = engine.stream(ids, GenerationParams(max_tokens=200))
        async for _ in stream:
            break  # the client disconnects after the first chunk
        await stream.aclose()
        for _ in range(100):
            if engine.running == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert asyncio.run(run()), "the cancelled request still holds a batch row"


def test_a_slow_reader_gets_the_tokens_that_piled_up_as_one_chunk(engine, model_and_tokenizer):
    """Deltas waiting in a request's queue go out together (fewer SSE events and Serve hops when
    the consumer lags); the text and counts stay what a fast reader gets."""
    model, tokenizer = model_and_tokenizer
    ids = _prompt_ids(tokenizer, QUESTIONS[0])
    params = GenerationParams(max_tokens=24, ignore_eos=True)

    async def read(pause):
        chunks = []
        async for chunk in engine.stream(ids, params):
            chunks.append(chunk)
            await asyncio.sleep(pause)  # the engine decodes several tokens meanwhile
        return chunks

    fast, slow = asyncio.run(read(0)), asyncio.run(read(0.5))
    assert "".join(c.text for c in slow) == "".join(c.text for c in fast) == _alone(model, tokenizer, ids, 24)
    assert slow[-1].completion_tokens == fast[-1].completion_tokens == 24
    assert slow[-1].finish_reason == fast[-1].finish_reason == "length"
    assert len(slow) < len(fast) / 2, (len(slow), len(fast))
    assert [c.completion_tokens for c in slow] == sorted(c.completion_tokens for c in slow)


def test_an_error_queued_behind_text_comes_after_that_text():
    from meddistill.serve.engine import Chunk, _coalesce

    async def run():
        queue = asyncio.Queue()
        for item in (Chunk("b", 3, 2), RuntimeError("generation failed")):
            queue.put_nowait(item)
        merged = _coalesce(Chunk("a", 3, 1), queue)
        return merged, queue.get_nowait(), queue.empty()

    merged, error, empty = asyncio.run(run())
    assert (merged.text, merged.completion_tokens, merged.finish_reason) == ("ab", 2, None)
    assert isinstance(error, RuntimeError) and empty


def test_stream_interval_sends_the_first_token_alone_then_chunks_of_n(model_and_tokenizer):
    """serving.streamInterval: after the first chunk (time to first token is unchanged) every chunk
    but the last carries at least N tokens; a fast reader gets the same text and counts."""
    model, tokenizer = model_and_tokenizer
    ids = _prompt_ids(tokenizer, QUESTIONS[1])
    params = GenerationParams(max_tokens=18, ignore_eos=True)
    eng = TransformersEngine(model, tokenizer, max_batch_size=2, max_model_len=256, stream_interval=4)

    async def read():
        return [chunk async for chunk in eng.stream(ids, params)]

    try:
        chunks = asyncio.run(read())
    finally:
        eng.shutdown()
    counts = [c.completion_tokens for c in chunks]
    assert counts[0] == 1, counts
    assert all(b - a >= 4 for a, b in zip(counts, counts[1:-1])), counts  # the last one may be shorter
    assert counts[-1] == 18 and chunks[-1].finish_reason == "length"
    assert len(chunks) <= 1 + -(-17 // 4), counts
    assert "".join(c.text for c in chunks) == _alone(model, tokenizer, ids, 18)


def test_stream_interval_sends_the_text_it_gathered_before_an_error(model_and_tokenizer):
    from meddistill.serve.engine import Chunk, _Request

    model, tokenizer = model_and_tokenizer
    eng = TransformersEngine(model, tokenizer, max_batch_size=1, max_model_len=256, stream_interval=8)
    eng.shutdown()  # no engine thread: this test plays it, through the request's queue

    async def run():
        stream = eng.stream([1, 2, 3], GenerationParams(max_tokens=20))
        first_read = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        req: _Request = eng._waiting[0]
        req.queue.put_nowait(Chunk("a", 3, 1))
        first = await first_read
        second_read = asyncio.ensure_future(stream.__anext__())
        for item in (Chunk("b", 3, 2), Chunk("c", 3, 3), RuntimeError("generation failed")):
            await asyncio.sleep(0)  # one step at a time: the reader is gathering towards 8 tokens
            req.queue.put_nowait(item)
        second = await second_read
        with pytest.raises(RuntimeError, match="generation failed"):
            await stream.__anext__()
        return first, second

    first, second = asyncio.run(run())
    assert (first.text, first.completion_tokens) == ("a", 1)
    assert (second.text, second.completion_tokens) == ("bc", 3)
