"""`ptv2 serve` as OpenAI-client users meet it: the official `openai` client against the real
command on an embedded Ray Serve, with two prompts on the real SmolLM2-135M.

Completions and chat completions, streamed and not, equal `ptv2 generate` alone (greedy);
continuous batching lets a late short request finish before an earlier long one, every row
equal to its prompt alone; a client that goes away mid-stream frees its row; the Prometheus
counters Ray exports equal the requests made; tenants of one server cannot use, list or learn of
each other's prompts, and only an admin token changes them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import free_port, stop_serve, wait_for
from tests.serving_helpers import alone, make_prompt

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "User: {prompt}\nAssistant:"
ALICE, BOB, ADMIN = "alice-token-0123456789", "bob-token-0123456789ab", "admin-token-0123456789"
QUESTIONS = ["What is the capital of France?", "Tell me a joke", "hi", "Do you like music?"]


def _end_with_parent() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


@pytest.fixture(scope="module")
def server():
    from ptv2.assets import smollm2_path

    d = Path(tempfile.mkdtemp(prefix="ptv2-openai-test-"))
    base = smollm2_path()
    prompts = {
        "chat-a": make_prompt(d / "a", base, "causal-lm", "ptv2", 8, seed=1, template=TEMPLATE),
        "chat-b": make_prompt(d / "b", base, "causal-lm", "prompt-tuning", 6, seed=2, template=TEMPLATE),
        "bob-secret": make_prompt(d / "s", base, "causal-lm", "ptv2", 4, seed=3, template=TEMPLATE),
    }
    tokens = {
        "tokens": [
            {"token": ALICE, "prompts": ["chat-*"]},
            {"token": BOB, "prompts": ["bob-*"]},
            {"token": ADMIN, "prompts": ["*"], "admin": True},
        ]
    }
    (d / "tokens.yaml").write_text(json.dumps(tokens))
    port, metrics_port = free_port(), free_port()
    short = Path("/tmp") / f"ptv2o{os.getpid()}"  # Ray's socket paths must stay short
    short.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PTV2_HOME": str(d / "home"),
        "RAY_TMPDIR": str(short),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "RAY_metrics_report_interval_ms": "1000",  # counters reach the exporter within ~1.5 s
    }
    args = [f"--prompt=chat-a={prompts['chat-a']}", f"--prompt=chat-b={prompts['chat-b']}"]
    args += [f"--prompt=bob-secret={prompts['bob-secret']}", "--token-file", str(d / "tokens.yaml")]
    args += ["--port", str(port), "--metrics-port", str(metrics_port), "--max-batch-size", "8"]
    args += ["--max-new-tokens", "512", "--refresh-s", "0"]
    log = open(d / "serve.log", "w")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "serve", *args],
        cwd=d,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_end_with_parent if sys.platform == "linux" else None,
    )
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            pytest.fail(f"ptv2 serve exited {proc.returncode}:\n{(d / 'serve.log').read_text()[-4000:]}")
        try:
            return urllib.request.urlopen(url + "/health", timeout=5).status == 200
        except OSError:
            return False

    wait_for(up, 300, "ptv2 serve to come up", step=1, context=lambda: (d / "serve.log").read_text()[-3000:])
    yield {"url": url, "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "base": base, "prompts": prompts}
    stop_serve(proc, log, short, d)


@pytest.fixture(scope="module")
def expected(server):
    """Each prompt alone (`ptv2 generate`'s code path), greedy, 24 new tokens."""
    from transformers import AutoTokenizer

    from ptv2.infer import generate

    tok = AutoTokenizer.from_pretrained(server["base"])
    out = {}
    for name in ("chat-a", "chat-b"):
        model = alone(server["prompts"][name], server["base"])
        out[name] = dict(zip(QUESTIONS, generate(model, tok, QUESTIONS, max_new_tokens=24), strict=True))
    return out


def client(server, token=ALICE):
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=token, max_retries=0, timeout=120)


def test_openai_client_completions_and_chat_streamed_or_not_equal_the_prompt_alone(server, expected):
    c = client(server)
    for name in ("chat-a", "chat-b"):
        for q in QUESTIONS:
            want = expected[name][q]
            whole = c.completions.create(model=name, prompt=q, max_tokens=24, temperature=0)
            assert whole.choices[0].text == want, (name, q)
            assert whole.usage.completion_tokens <= 24 and whole.usage.prompt_tokens > 0
            chunks = list(
                c.completions.create(
                    model=name,
                    prompt=q,
                    max_tokens=24,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
            assert chunks[-1].usage.total_tokens == whole.usage.total_tokens and not chunks[-1].choices
            assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason

            messages = [{"role": "user", "content": q}]
            chat = c.chat.completions.create(model=name, messages=messages, max_tokens=24, temperature=0)
            assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"
            streamed = c.chat.completions.create(
                model=name, messages=messages, max_tokens=24, temperature=0, stream=True
            )
            assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == want

    import openai

    # a conversation the prompt was not trained on is refused by name
    with pytest.raises(openai.BadRequestError, match="trained on one user turn"):
        c.chat.completions.create(
            model="chat-a", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.BadRequestError, match="n is not supported"):
        c.chat.completions.create(model="chat-a", messages=[{"role": "user", "content": "hi"}], n=2)


def test_continuous_batching_lets_a_late_short_request_finish_first_each_equal_alone(server, expected):
    c = client(server)
    finished: dict[str, float] = {}
    long_text: list[str] = []

    counting = "1, 2, 3, 4, 5, 6, 7, 8,"  # sent raw: a continuation that does not end soon

    def long_request():
        stream = c.completions.create(
            model="chat-a", prompt=counting, max_tokens=160, temperature=0, stream=True, extra_body={"raw": True}
        )
        for chunk in stream:
            if chunk.choices:
                long_text.append(chunk.choices[0].text)
        finished["long"] = time.monotonic()

    thread = threading.Thread(target=long_request)
    thread.start()
    wait_for(lambda: len(long_text) >= 2, 120, "the long request to be decoding")
    # while it decodes: other prompts and lengths join, each as it alone would answer
    asks = [("chat-b", QUESTIONS[1], 4), ("chat-a", QUESTIONS[2], 24), ("chat-b", QUESTIONS[3], 16)]
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(
            pool.map(lambda a: c.completions.create(model=a[0], prompt=a[1], max_tokens=a[2], temperature=0), asks)
        )
    finished["short"] = time.monotonic()
    assert "long" not in finished, "the long request ended before the short ones: nothing was shown"
    for (name, q, n), got in zip(asks, answers, strict=True):
        assert expected[name][q].startswith(got.choices[0].text) and got.usage.completion_tokens <= n
        if n == 24:
            assert got.choices[0].text == expected[name][q]
    thread.join(timeout=300)
    assert finished["short"] < finished["long"]
    from transformers import AutoTokenizer

    from ptv2.infer import generate

    model = alone(server["prompts"]["chat-a"], server["base"])
    tok = AutoTokenizer.from_pretrained(server["base"])
    assert "".join(long_text) == generate(model, tok, [counting], max_new_tokens=160, raw=True)[0]


def _stats(server) -> dict:
    req = urllib.request.Request(server["url"] + "/v1/stats", headers={"Authorization": f"Bearer {ALICE}"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


def test_a_client_that_goes_away_mid_stream_frees_its_row(server):
    before = _stats(server)["decode_steps"]
    body = {"model": "chat-a", "prompt": "Count to a thousand", "max_tokens": 500, "temperature": 0, "stream": True}
    req = urllib.request.Request(
        server["url"] + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"},
    )
    response = urllib.request.urlopen(req, timeout=60)
    lines = [response.readline() for _ in range(6)]  # a few chunks arrive: it is decoding
    assert any(line.startswith(b"data: {") for line in lines)
    response.close()  # the client goes away

    def settled():
        a = _stats(server)["decode_steps"]
        time.sleep(1.5)
        return a == _stats(server)["decode_steps"]

    wait_for(settled, 120, "the decoder to go idle")
    assert _stats(server)["decode_steps"] - before < 250, "the abandoned row kept decoding toward 500 tokens"


def _scrape(server) -> dict[tuple[str, str, str], float]:
    text = urllib.request.urlopen(server["metrics"], timeout=30).read().decode()
    out: dict[tuple[str, str, str], float] = {}
    for m in re.finditer(r"^ray_ptv2_requests_total\{([^}]*)\} ([0-9.e+]+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        key = (labels.get("route", ""), labels.get("prompt", ""), labels.get("status", ""))
        out[key] = out.get(key, 0.0) + float(m.group(2))
    return out


def test_scraped_request_counters_equal_the_requests_made(server):
    c = client(server)
    before = _scrape(server)
    for q in QUESTIONS[:3]:
        c.completions.create(model="chat-b", prompt=q, max_tokens=2, temperature=0)
    for q in QUESTIONS[:2]:
        c.chat.completions.create(model="chat-b", messages=[{"role": "user", "content": q}], max_tokens=2)
    with pytest.raises(Exception):  # noqa: B017 (any 404 error of the client)
        c.completions.create(model="bob-secret", prompt="x", max_tokens=2)
    want = {
        ("/v1/completions", "chat-b", "200"): 3,
        ("/v1/chat/completions", "chat-b", "200"): 2,
        ("/v1/completions", "", "404"): 1,  # a name the caller may not use is no label
    }

    def counted():
        now = _scrape(server)
        return all(now.get(k, 0) - before.get(k, 0) == n for k, n in want.items())

    wait_for(counted, 60, "the counters to reach the exporter", context=lambda: str(_scrape(server)))
    text = urllib.request.urlopen(server["metrics"], timeout=30).read().decode()
    for name in ("ray_ptv2_time_to_first_token_s_bucket", "ray_ptv2_completion_tokens_total", "ray_serve_"):
        assert name in text, name


def _call(server, path, token, body=None, method=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        server["url"] + path,
        data=data,
        method=method or ("POST" if data else "GET"),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_tenants_cannot_use_list_or_learn_of_each_others_prompts(server):
    ask = lambda token, name: _call(server, "/v1/completions", token, {"model": name, "prompt": "hi", "max_tokens": 2})  # noqa: E731
    assert ask(BOB, "bob-secret")[0] == 200 and ask(ALICE, "chat-a")[0] == 200
    # another tenant's prompt answers exactly as a prompt that does not exist
    hidden, missing = ask(ALICE, "bob-secret"), ask(ALICE, "bob-nothing")
    assert hidden[0] == missing[0] == 404
    assert hidden[1]["error"]["message"].replace("bob-secret", "X") == missing[1]["error"]["message"].replace(
        "bob-nothing", "X"
    )
    assert hidden[1]["error"]["prompts"] == ["chat-a", "chat-b"]
    assert ask(BOB, "chat-a")[1]["error"]["prompts"] == ["bob-secret"]
    assert [m["id"] for m in _call(server, "/v1/models", ALICE)[1]["data"]] == ["chat-a", "chat-b"]
    assert [m["id"] for m in _call(server, "/v1/models", BOB)[1]["data"]] == ["bob-secret"]
    assert [p["name"] for p in _call(server, "/v1/prompts", BOB)[1]["prompts"]] == ["bob-secret"]
    assert _call(server, "/v1/models", "wrong-token-0123456789")[0] == 401
    # only the admin token changes prompts
    add = {"name": "chat-c", "source": str(server["prompts"]["chat-a"])}
    assert _call(server, "/v1/prompts", ALICE, add)[0] == 403
    assert _call(server, "/v1/prompts/chat-a", ALICE, method="DELETE")[0] == 403
    status, body = _call(server, "/v1/prompts", ADMIN, add)
    assert status == 201, body
    assert "chat-c" in [m["id"] for m in _call(server, "/v1/models", ALICE)[1]["data"]]  # chat-* is Alice's
    assert "chat-c" not in [m["id"] for m in _call(server, "/v1/models", BOB)[1]["data"]]
    assert _call(server, "/v1/prompts/chat-c", ADMIN, method="DELETE")[0] == 200
