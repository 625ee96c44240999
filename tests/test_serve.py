"""`ptv2 serve` end to end: the real command on an embedded Ray Serve, over HTTP.

Four prompts on one tiny Llama — a classifier and a tagger from folders, a chat prompt from the
registry alias models:/chat@prod, a prompt-tuning prompt by run id — answer concurrent requests
exactly as each prompt does alone; the alias moves to a new version mid-traffic and the server
switches after verifying it; a stream of hostile requests mixed with good ones gets a 4xx JSON
error each while every good one is answered correctly, and the server stays up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ptv2.infer import generate as generate_alone
from ptv2.infer import predict as predict_alone
from tests.helpers import free_port, stop_serve
from tests.serving_helpers import alone, make_prompt, save_base
from tests.tiny import tiny_tokenizer

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789abcdef"
TEXTS = ["w1 w2 w3", "w5", "w7 w8 w9 w10 w11 w12", "w4 w4 w9", "w3 w60", "w11 w12 w13 w14"]
TEMPLATE = "w30 {prompt} w31"


def call(
    url: str, path: str, body=None, token: str | None = TOKEN, raw: bytes | None = None, headers=None, method=None
):
    """(status, JSON body) of one request; errors are answers too."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    h = {"Content-Type": "application/json", **(headers or {})}
    if token:
        h["Authorization"] = f"Bearer {token}"
    method = method or ("POST" if data is not None else "GET")
    req = urllib.request.Request(url + path, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read()
    try:
        return status, json.loads(text)
    except ValueError:  # not JSON: kept whole, so a failing assertion shows it
        return status, {"not_json": text.decode(errors="replace")[:2000]}


class Registry:
    """A sqlite MLflow store with prompts logged to runs and registered (what `ptv2 run` does)."""

    def __init__(self, d: Path) -> None:
        from ptv2.tracking import Tracker

        self.uri = f"sqlite:///{d / 'mlflow.db'}"
        self.client = Tracker(self.uri).client
        self.exp = self.client.create_experiment("serve", artifact_location=(d / "artifacts").as_uri())

    def log(self, prompt_dir: Path) -> str:
        run = self.client.create_run(self.exp)
        self.client.log_artifacts(run.info.run_id, str(prompt_dir), "prompt")
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    def register(self, prompt_dir: Path, name: str, alias: str | None = None) -> str:
        from launcher.prompts import promote, register

        version = register(self.uri, self.log(prompt_dir), name)
        if alias:
            promote(self.uri, name, version, alias)
        return version


def _end_with_parent() -> None:
    """In the server's process: SIGINT it when the test process dies (Linux), so an interrupted
    test run leaves no server behind."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


@pytest.fixture(scope="module")
def server():
    # not under pytest's basetemp: another pytest session of this user may prune it mid-test
    d = Path(tempfile.mkdtemp(prefix="ptv2-serve-test-"))
    base = save_base(d / "base", "llama")
    prompts = {
        "cls": make_prompt(d / "cls", base, "seq-cls", "ptv2", 3, seed=1),
        "cls-b": make_prompt(d / "cls-b", base, "seq-cls", "ptv2", 6, seed=7),
        "tag": make_prompt(d / "tag", base, "token-cls", "ptv2", 2, seed=2),
        "tag-b": make_prompt(d / "tag-b", base, "token-cls", "ptv2", 5, seed=8),
        "chat": make_prompt(d / "chat-v1", base, "causal-lm", "ptv2", 5, seed=3, template=TEMPLATE),
        "chat-v2": make_prompt(d / "chat-v2", base, "causal-lm", "ptv2", 6, seed=4, template=TEMPLATE),
        "soft": make_prompt(d / "soft", base, "causal-lm", "prompt-tuning", 4, seed=5),
        "foreign": make_prompt(d / "foreign", save_base(d / "other", "llama", seed=9), "seq-cls", seed=6),
    }
    registry = Registry(d)
    assert registry.register(prompts["chat"], "chat", "prod") == "1"
    soft_run = registry.log(prompts["soft"])
    (d / "token").write_text(TOKEN + "\n")
    port = free_port()
    short = Path("/tmp") / f"ptv2s{os.getpid()}"  # Ray's socket paths must stay short
    short.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),  # the replicas import this checkout
        "PTV2_HOME": str(d / "home"),
        "RAY_TMPDIR": str(short),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    args = ["--prompt", f"cls={prompts['cls']}", "--prompt", f"tag={prompts['tag']}"]
    args += ["--prompt", f"cls-b={prompts['cls-b']}", "--prompt", f"tag-b={prompts['tag-b']}"]
    args += ["--prompt", "chat=models:/chat@prod", "--prompt", f"soft={soft_run}"]
    args += ["--tracking-uri", registry.uri, "--port", str(port), "--token-file", str(d / "token")]
    args += ["--max-batch-size", "8", "--refresh-s", "0", "--max-new-tokens", "64"]
    log = open(d / "serve.log", "w")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "serve", *args],
        cwd=d,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its Ray processes can be found (and ended) as one group
        preexec_fn=_end_with_parent if sys.platform == "linux" else None,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ptv2 serve exited {proc.returncode}:\n{(d / 'serve.log').read_text()[-4000:]}")
        try:
            if call(url, "/health", token=None)[0] == 200:
                break
        except OSError:  # not listening yet
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"ptv2 serve did not come up:\n{(d / 'serve.log').read_text()[-4000:]}")
    yield {"url": url, "base": base, "prompts": prompts, "registry": registry, "proc": proc, "dir": d}
    stop_serve(proc, log, short, d)


@pytest.fixture(scope="module")
def expected(server):
    """What each prompt answers alone (ptv2 predict / ptv2 generate's code path)."""
    tok = tiny_tokenizer()
    p, base = server["prompts"], server["base"]
    out = {}
    for name in ("cls", "tag", "cls-b", "tag-b"):
        model = alone(p[name], base)
        out[name] = {t: predict_alone(model, tok, [t])[0] for t in TEXTS}
    for name in ("chat", "chat-v2", "soft"):
        model = alone(p[name], base)
        out[name] = {t: generate_alone(model, tok, [t], max_new_tokens=8)[0] for t in TEXTS}
    return out


def _good_requests():
    """(path, body, check name, text): predictions and generations for four prompts."""
    reqs = []
    for t in TEXTS:
        reqs.append(("/v1/predict", {"prompt": "cls", "input": t}, "cls", t))
        reqs.append(("/v1/predict", {"prompt": "tag", "input": t}, "tag", t))
        reqs.append(("/v1/generate", {"prompt": "chat", "input": t, "max_new_tokens": 8}, "chat", t))
        body = {"model": "soft", "prompt": t, "max_tokens": 8, "temperature": 0}
        reqs.append(("/v1/completions", body, "soft", t))
    return reqs


def _check(expected, name, text, status, body, chat="chat"):
    assert status == 200, body
    if name.startswith("cls"):
        want = expected[name][text]
        got = body["results"][0]
        assert got["label"] == want["label"]
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)
    elif name.startswith("tag"):
        want = expected[name][text]
        assert body["results"][0]["tags"] == want["tags"] and body["results"][0]["tokens"] == want["tokens"]
    elif name == "chat":
        assert body["results"][0]["output"] == expected[chat][text]
    else:
        assert body["object"] == "text_completion" and body["model"] == "soft"
        assert body["choices"][0]["text"] == expected["soft"][text]


def test_three_prompts_at_once_answer_as_each_alone_in_shared_batches(server, expected):
    url = server["url"]
    before = call(url, "/v1/stats")[1]
    reqs = _good_requests() * 2
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda r: call(url, r[0], r[1]), reqs))
    for (_, _, name, text), (status, body) in zip(reqs, answers, strict=True):
        _check(expected, name, text, status, body)
    after = call(url, "/v1/stats")[1]
    batches = after["predict_batches"] - before["predict_batches"]
    prompts = after["predict_prompts"] - before["predict_prompts"]
    assert prompts > batches and after["predict_largest"] > 1, after  # some batches held rows of several prompts
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decode_rows"] - before["decode_rows"]
    assert rows > steps and after["decode_largest"] > 1, after  # generations decoded side by side


def test_a_registry_alias_moved_mid_traffic_switches_after_verification(server, expected):
    url, registry = server["url"], server["registry"]
    listed = {p["name"]: p for p in call(url, "/v1/prompts")[1]["prompts"]}
    assert listed["chat"]["version"] == "1" and listed["chat"]["source"] == "models:/chat@prod"
    seen, stop = [], threading.Event()

    def traffic():
        while not stop.is_set():
            status, body = call(url, "/v1/generate", {"prompt": "chat", "input": TEXTS[2], "max_new_tokens": 8})
            seen.append((status, body["results"][0]["output"] if status == 200 else body))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        time.sleep(1)
        assert registry.register(server["prompts"]["chat-v2"], "chat", "prod") == "2"
        time.sleep(1)
        status, body = call(url, "/v1/prompts/refresh", {})
        assert status == 200 and body["changes"] == [{"name": "chat", "from": "1", "to": "2"}], body
        time.sleep(1)
    finally:
        stop.set()
        worker.join()
    outputs = [o for s, o in seen]
    assert all(s == 200 for s, _ in seen), seen
    v1, v2 = expected["chat"][TEXTS[2]], expected["chat-v2"][TEXTS[2]]
    assert v1 != v2 and set(outputs) <= {v1, v2}
    switched = outputs.index(v2)
    assert outputs[:switched] == [v1] * switched and set(outputs[switched:]) == {v2} and switched > 0
    for t in TEXTS:  # every later request: the new version
        _check(
            expected,
            "chat",
            t,
            *call(url, "/v1/generate", {"prompt": "chat", "input": t, "max_new_tokens": 8}),
            chat="chat-v2",
        )
    listed = {p["name"]: p for p in call(url, "/v1/prompts")[1]["prompts"]}
    assert listed["chat"]["version"] == "2" and listed["chat"]["length"] == 6
    # a prompt for another base model is refused at load, naming both fingerprints; nothing changes
    status, body = call(url, "/v1/prompts", {"name": "foreign", "source": str(server["prompts"]["foreign"])})
    assert status == 422 and "another base model" in body["error"]["message"]
    assert body["error"]["message"].count("(fingerprint ") == 2
    # and a prompt added without a restart serves at once
    status, body = call(url, "/v1/prompts", {"name": "cls2", "source": str(server["prompts"]["cls"])})
    assert status == 201 and body["task"] == "seq-cls"
    status, body = call(url, "/v1/predict", {"prompt": "cls2", "input": TEXTS[0]})
    assert status == 200 and body["results"][0]["label"] == expected["cls"][TEXTS[0]]["label"]


def _hostile(server):
    """(expected status, path, body or raw bytes, token, headers): one of every kind of bad request."""
    big = b'{"prompt": "cls", "input": "' + b"w5 " * 400_000 + b'"}'
    long = " ".join(["w5"] * 300)
    return [
        (400, "/v1/predict", b'{"prompt": "cls", "input": ', TOKEN, None),
        (404, "/v1/predict", {"prompt": "nope", "input": "w1"}, TOKEN, None),
        (400, "/v1/predict", {"prompt": "../../etc/passwd", "input": "w1"}, TOKEN, None),
        (400, "/v1/predict", {"prompt": "cls", "input": "   "}, TOKEN, None),
        (400, "/v1/predict", {"prompt": "tag", "input": []}, TOKEN, None),
        (413, "/v1/predict", {"prompt": "cls", "input": long, "truncate": False}, TOKEN, None),
        (413, "/v1/generate", {"prompt": "chat", "input": long}, TOKEN, None),
        (413, "/v1/predict", big, TOKEN, None),
        (400, "/v1/predict", {"prompt": "chat", "input": "w1"}, TOKEN, None),
        (400, "/v1/generate", {"prompt": "cls", "input": "w1"}, TOKEN, None),
        (401, "/v1/predict", {"prompt": "cls", "input": "w1"}, None, None),
        (401, "/v1/predict", {"prompt": "cls", "input": "w1"}, "wrong-token-0123456789", None),
        (415, "/v1/predict", b"prompt=cls&input=w1", TOKEN, {"Content-Type": "application/x-www-form-urlencoded"}),
        (422, "/v1/predict", {"prompt": "cls", "input": 5}, TOKEN, None),
        (422, "/v1/predict", {"prompt": "cls", "input": "w1", "exec": "import os"}, TOKEN, None),
        (422, "/v1/predict", {"prompt": "cls"}, TOKEN, None),
        (422, "/v1/predict", [1, 2, 3], TOKEN, None),
        (400, "/v1/predict", {"prompt": "cls", "inputs": ["w1"] * 9}, TOKEN, None),
        (400, "/v1/generate", {"prompt": "chat", "input": "w1", "max_new_tokens": 65}, TOKEN, None),
        (422, "/v1/generate", {"prompt": "chat", "input": "w1", "temperature": -1}, TOKEN, None),
        (400, "/v1/completions", {"model": "soft", "prompt": "w1", "n": 2}, TOKEN, None),
        (422, "/v1/completions", {"model": "soft", "prompt": "w1", "stream": "sometimes"}, TOKEN, None),
        (400, "/v1/chat/completions", {"model": "cls", "messages": [{"role": "user", "content": "w1"}]}, TOKEN, None),
        (400, "/v1/chat/completions", {"model": "soft", "messages": [{"role": "tool", "content": "w1"}]}, TOKEN, None),
        (422, "/v1/chat/completions", {"model": "soft", "messages": []}, TOKEN, None),
        (
            400,
            "/v1/chat/completions",
            {"model": "soft", "stream": True, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            TOKEN,
            None,
        ),
        (404, "/v1/completions", {"model": "gpt-4", "prompt": "w1"}, TOKEN, None),
        (422, "/v1/completions", {"model": "soft", "prompt": [1, 2]}, TOKEN, None),
        (404, "/v1/prompts", {"name": "x", "source": "/no/such/folder"}, TOKEN, None),
        (400, "/v1/prompts", {"name": "a/b", "source": str(server["prompts"]["cls"])}, TOKEN, None),
        (404, "/v1/nothing", {}, TOKEN, None),
    ]


def test_hostile_requests_mixed_with_good_ones_get_4xx_and_the_server_keeps_serving(server, expected):
    url = server["url"]
    listed = {p["name"]: p for p in call(url, "/v1/prompts")[1]["prompts"]}
    chat = "chat" if listed["chat"]["version"] == "1" else "chat-v2"  # the alias test may have moved it
    bad = _hostile(server)
    good = _good_requests()
    jobs = [("bad", b) for b in bad] + [("good", g) for g in good]
    jobs = [j for pair in zip(jobs[::2], jobs[1::2], strict=False) for j in pair] + jobs[len(jobs) // 2 * 2 :]

    def send(job):
        kind, item = job
        if kind == "good":
            return call(url, item[0], item[1])
        status, path, body, token, headers = item
        if isinstance(body, bytes):
            return call(url, path, raw=body, token=token, headers=headers)
        return call(url, path, body, token=token, headers=headers)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(send, jobs))
    for (kind, item), (status, body) in zip(jobs, answers, strict=True):
        if kind == "good":
            _check(expected, item[2], item[3], status, body, chat=chat)
        else:
            assert status == item[0], (item[:3] if not isinstance(item[2], bytes) else item[:2], status, body)
            assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["code"] == status
    by_status = {item[0] for kind, item in jobs if kind == "bad"}
    assert by_status == {400, 401, 404, 413, 415, 422}
    unknown = answers[jobs.index(("bad", bad[1]))][1]["error"]
    assert unknown["prompts"] == sorted(listed) and "no prompt 'nope'" in unknown["message"]
    assert call(url, "/health", token=None)[1]["status"] == "ok" and server["proc"].poll() is None
    for path, body, name, text in _good_requests()[:4]:  # still answering, correctly
        _check(expected, name, text, *call(url, path, body), chat=chat)


def _weights(url: str) -> dict[str, str]:
    return {p["name"]: p.get("weights_sha256") for p in call(url, "/v1/prompts")[1]["prompts"] if p["loaded"]}


def test_stress_mixed_traffic_while_prompts_come_and_go_and_hostile_bodies_arrive(server, expected):
    """For a bounded time: threads send mixed predict/generate requests for prompts of every task
    and two prefix lengths, one adds, replaces and removes a prompt and moves a registry alias,
    one sends hostile bodies. Every good answer equals its prompt alone; every bad one is a 4xx
    that names the problem; nothing is a 5xx; afterwards every prompt the server holds has exactly
    the weights a fresh load of its artifact has."""
    import random

    from ptv2 import serving as sv

    url, registry, p = server["url"], server["registry"], server["prompts"]
    listed = {x["name"]: x for x in call(url, "/v1/prompts")[1]["prompts"]}
    chat_now = {"v": "chat" if listed["chat"]["length"] == 5 else "chat-v2"}  # the alias test may have moved it
    deadline = time.monotonic() + 20
    problems: list = []

    def traffic(seed: int) -> int:
        rng, n = random.Random(seed), 0
        while time.monotonic() < deadline:
            t = rng.choice(TEXTS)
            kind = rng.choice(["cls", "cls-b", "tag", "tag-b", "chat", "soft", "temp", "swap"])
            if kind in ("cls", "cls-b", "tag", "tag-b"):
                status, body = call(url, "/v1/predict", {"prompt": kind, "input": t})
                try:
                    _check(expected, kind, t, status, body)
                except AssertionError as e:
                    problems.append((kind, t, str(e)[:300]))
            elif kind in ("chat", "temp"):
                body = {"prompt": "chat", "input": t, "max_new_tokens": 8}
                if kind == "temp":
                    body["temperature"] = 1e-39  # as cold as it gets: greedy
                status, out = call(url, "/v1/generate", body)
                if status != 200 or out["results"][0]["output"] not in (expected["chat"][t], expected["chat-v2"][t]):
                    problems.append((kind, t, status, out))
            elif kind == "soft":
                body = {"model": "soft", "prompt": t, "max_tokens": 8, "temperature": 0}
                try:
                    _check(expected, "soft", t, *call(url, "/v1/completions", body))
                except AssertionError as e:
                    problems.append((kind, t, str(e)[:300]))
            else:  # the prompt the admin thread replaces and removes: one of its versions, or gone
                status, body = call(url, "/v1/predict", {"prompt": "swap", "input": t})
                if status == 404 and "no prompt 'swap'" in body["error"]["message"]:
                    pass
                elif status != 200 or body["results"][0]["label"] not in (
                    expected["cls"][t]["label"],
                    expected["cls-b"][t]["label"],
                ):
                    problems.append((kind, t, status, body))
            n += 1
        return n

    def admin() -> int:
        n = 0
        while time.monotonic() < deadline:
            for source in ("cls", "cls-b"):
                status, body = call(url, "/v1/prompts", {"name": "swap", "source": str(p[source])})
                if status != 201:
                    problems.append(("add", status, body))
            status, body = call(url, "/v1/prompts/swap", method="DELETE")
            if status != 200:
                problems.append(("remove", status, body))
            version = registry.register(p[chat_now["v"]], "chat", "prod")  # the same weights again
            status, body = call(url, "/v1/prompts/refresh", {})
            if status != 200 or any("error" in c for c in body["changes"]):
                problems.append(("refresh", version, status, body))
            n += 1
        return n

    hostile = [
        (422, {"prompt": "chat", "input": "w1", "temperature": 1e9}, "temperature"),
        (422, b'{"prompt": "chat", "input": "w1", "temperature": NaN}', "temperature"),
        (422, b'{"prompt": "chat", "input": "w1", "top_p": Infinity}', "top_p"),
        (422, {"prompt": "chat", "input": "w1", "top_k": -1}, "top_k"),
        (413, {"prompt": "chat", "input": " ".join(["w5"] * 300)}, "tokens"),
        (400, {"prompt": "cls", "input": "w1"}, "generate needs causal-lm"),
        (404, {"prompt": "ghost", "input": "w1"}, "no prompt 'ghost'"),
    ]

    def attacker() -> int:
        n = 0
        while time.monotonic() < deadline:
            for want, body, words in hostile:
                if isinstance(body, bytes):
                    status, answer = call(url, "/v1/generate", raw=body)
                else:
                    status, answer = call(url, "/v1/generate", body)
                if status != want or words not in json.dumps(answer):
                    problems.append(("hostile", want, status, answer))
                n += 1
        return n

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(traffic, s) for s in range(5)] + [pool.submit(admin), pool.submit(attacker)]
        counts = [f.result() for f in futures]
    assert not problems, problems[:5]
    assert min(counts) > 0 and sum(counts[:5]) > 50, counts
    # what the server holds now equals a fresh load of each artifact, bit for bit
    served = sv.ServedBase.load(server["base"], tokenizer=tiny_tokenizer())
    held = _weights(url)
    for name in ("cls", "cls-b", "tag", "tag-b", "soft"):
        assert held[name] == sv.LoadedPrompt.load(served, name, p[name]).weights_sha256(), name
    assert held["chat"] == sv.LoadedPrompt.load(served, "chat", p[chat_now["v"]]).weights_sha256()
    assert server["proc"].poll() is None and call(url, "/health", token=None)[0] == 200


def test_the_scheduler_fills_prediction_batches_while_the_model_computes():
    """Requests that arrive while a batch computes all go into the next forward (whole requests,
    up to max_rows); a request whose rows fail fails alone, the others batched with it are
    answered, and the model thread goes on."""
    from ptv2.scheduler import Scheduler

    calls, busy = [], threading.Event()

    class Probe(Scheduler):  # the model: records its batches, the first one slow
        def run_predictions(self, rows):
            calls.append(list(rows))
            if len(calls) == 1:
                busy.wait(10)  # the first batch computes while more requests arrive
            if 0 in rows:
                raise ValueError("bad row")
            return [r * 10 for r in rows]

    scheduler = Probe(None, max_rows=4)
    try:
        first = scheduler.predict([1])
        time.sleep(0.2)
        rest = [scheduler.predict(rows) for rows in ([2], [3, 4], [5], [6, 7])]
        time.sleep(0.2)
        busy.set()
        assert [first.result(10)] + [f.result(10) for f in rest] == [[10], [20], [30, 40], [50], [60, 70]]
        assert calls == [[1], [2, 3, 4, 5], [6, 7]]
        busy.clear()
        calls.clear()
        blocker = scheduler.predict([11])
        time.sleep(0.2)
        bad, good = scheduler.predict([0]), scheduler.predict([12])
        time.sleep(0.2)
        busy.set()
        assert blocker.result(10) == [110] and good.result(10) == [120]
        with pytest.raises(ValueError, match="bad row"):
            bad.result(10)
        assert scheduler.predict([9]).result(10) == [90]
        assert calls == [[11], [0, 12], [0], [12], [9]]
    finally:
        scheduler.close()


def test_serving_on_a_cluster_whose_serve_listens_elsewhere_is_refused_naming_the_real_bind(tmp_path):
    """Ray Serve keeps the HTTP host and port it started with (Ray only warns): `ptv2 serve
    --address` with other ones must refuse, saying where Serve really listens, rather than trust
    a host (for the admin check and the token warning) that is not the real one."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    short = Path("/tmp") / f"ptv2b{os.getpid()}"  # Ray's socket paths must stay short
    short.mkdir(exist_ok=True)
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(short)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    taken = free_port()
    try:
        ray.init(address=cluster.address)
        serve.start(http_options={"host": "127.0.0.1", "port": taken})
        base = save_base(tmp_path / "base", "llama")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PTV2_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "launcher.cli", "serve", "--model", str(base), "--address", cluster.address]
            + ["--host", "127.0.0.1", "--port", str(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"Ray Serve already runs on this cluster, listening on 127.0.0.1:{taken}" in proc.stderr
        assert f"--host 127.0.0.1 --port {taken}" in proc.stderr
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(short, ignore_errors=True)


def test_replicas_on_one_host_fetch_a_cached_prompt_one_at_a_time(tmp_path):
    """Several replicas (threads here) materialize the same registry prompt into one cache at
    once: each gets a verified folder (without the per-entry lock one's rmtree ran under
    another's rename), and a copy damaged later is fetched again."""
    from launcher.serve_sources import materialize, pin
    from ptv2.artifact import FOLDED, read_manifest

    base = save_base(tmp_path / "base", "llama")
    registry = Registry(tmp_path)
    registry.register(make_prompt(tmp_path / "p", base, "seq-cls", "ptv2", 3), "cls", "prod")
    pinned = pin(registry.uri, "models:/cls@prod").pinned
    cache = tmp_path / "cache"

    def load(_):
        folder = materialize(registry.uri, pinned, cache)
        return read_manifest(folder)["files"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(load, range(16)))
    assert all(r == results[0] for r in results)
    folder = materialize(registry.uri, pinned, cache)
    (folder / FOLDED).write_bytes(b"damaged")
    assert read_manifest(materialize(registry.uri, pinned, cache))["files"] == results[0]


def test_a_prompt_version_that_failed_to_load_is_retried_with_backoff():
    from launcher.serve_sources import Entry, LoadFailures

    f = LoadFailures()
    entry = Entry("chat", "models:/chat@prod", "runs:/abc/prompt", "3")
    assert f.may_try("chat", entry.pinned, now=0)
    f.record("chat", entry, "the tracking server did not answer", now=100)
    assert not f.may_try("chat", entry.pinned, now=104) and f.may_try("chat", entry.pinned, now=105)
    f.record("chat", entry, "again", now=105)
    assert not f.may_try("chat", entry.pinned, now=114) and f.may_try("chat", entry.pinned, now=115)
    assert f.may_try("chat", "runs:/def/prompt", now=106)  # another version: at once
    for i in range(20):
        f.record("chat", entry, "down", now=1000 + i)
    assert f.get("chat")["attempts"] == 22 and f.may_try("chat", entry.pinned, now=1019 + LoadFailures.MAX_S)
    f.clear("chat")
    assert f.get("chat") is None
