"""The HTTP server, for real: `launch.py serve` in a subprocess (Ray, Serve, the actor engine),
spoken to over HTTP with the official openai client, httpx and hypothesis. The served pair and the
shared server are ``conftest.py``'s ``served`` and ``server``."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from dovetail.protocol.shm import segment_names as _segments
from dovetail.serve.server import free_port
from tiny_models import VOCAB, hf_greedy

def _reference(served, prompt_ids, n):
    target, tokenizer, _ = served
    return tokenizer.decode(hf_greedy(target, prompt_ids, n, eos=1), skip_special_tokens=True)


def _text_prompt(i: int, length: int = 6) -> str:
    gen = torch.Generator().manual_seed(i)
    return " ".join(f"w{t}" for t in torch.randint(3, VOCAB, (length,), generator=gen).tolist())


def _metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)"
    match = re.search(r"^" + pattern + "$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _sse(response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def test_openai_client_completion_chat_and_stream(server, served):
    import openai

    _, tokenizer, _ = served
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["target"]

    prompt = "w5 w6 w7"
    done = client.completions.create(model="target", prompt=prompt, max_tokens=20, temperature=0)
    assert done.choices[0].text == _reference(served, tokenizer.encode(prompt), 20)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 20
    spec = done.usage.model_extra["speculative"]
    assert spec["steps"] >= 1 and 1.0 <= spec["mean_accepted"] <= 4.0

    messages = [{"role": "user", "content": "w9 w10 w11"}]
    chat_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False)
    chat = client.chat.completions.create(model="target", messages=messages, max_tokens=15, temperature=0)
    assert chat.choices[0].message.content == _reference(served, chat_ids, 15)
    assert chat.choices[0].message.role == "assistant"

    stream = client.chat.completions.create(model="target", messages=messages, max_tokens=15, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == chat.choices[0].message.content
    steps = chunks[-1].usage.model_extra["speculative"]["steps"]
    events = len([d for d in deltas if d])  # one per step, and one for the prefill's token
    assert 1 < events <= steps + 1, "one event per step, as the tokens come, not one lump"
    assert chunks[-1].usage.completion_tokens == 15 and chunks[-2].choices[0].finish_reason == "length"

    streamed = client.completions.create(model="target", prompt=prompt, max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text

    stopped = client.completions.create(model="target", prompt=prompt, max_tokens=20, temperature=0,
                                        stop=[done.choices[0].text.split()[3]])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == done.choices[0].text[:done.choices[0].text.index(done.choices[0].text.split()[3])]

    seeded = [client.completions.create(model="target", prompt=prompt, max_tokens=12, temperature=0.8, top_p=0.9,
                                        seed=3).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]

    deadline = time.monotonic() + 10  # records of requests another replica served arrive eventually
    while _metric(server["url"], "dovetail:request_success_total", 'finish_reason="length"') < 5:
        assert time.monotonic() < deadline, "fewer than 5 finished requests counted"
        time.sleep(0.2)
    for _ in range(3):  # a finished request is in the very next /metrics of its replica, never a scrape later
        before = _metric(server["url"], "dovetail:request_success_total", 'finish_reason="length"')
        client.completions.create(model="target", prompt=prompt, max_tokens=4, temperature=0)
        assert _metric(server["url"], "dovetail:request_success_total", 'finish_reason="length"') == before + 1
    assert _metric(server["url"], "dovetail:spec_decode_num_drafts_total") > 0
    assert _metric(server["url"], "dovetail:num_requests_waiting", f'replica="{_replica(server)}"') == 0
    logged = [json.loads(m.group(0)) for m in re.finditer(r'\{"event": "request_done".*\}', server["log"].read_text())]
    assert done.id in {entry["request_id"] for entry in logged}


def _replica(server) -> str:
    match = re.search(r'"event": "replica_ready", "replica": "([^"]+)"', server["log"].read_text())
    return match.group(1)


def test_32_concurrent_streams_are_exact_and_separate(server, served):
    _, tokenizer, _ = served
    prompts = [_text_prompt(i, 3 + i % 7) for i in range(32)]
    results: dict[int, list[dict]] = {}

    def run(i):
        body = {"prompt": prompts[i], "max_tokens": 24, "temperature": 0, "stream": True}
        with httpx.stream("POST", server["url"] + "/v1/completions", json=body, timeout=300) as response:
            assert response.status_code == 200
            results[i] = _sse(response)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 32
    for i, events in results.items():
        assert len({e["id"] for e in events}) == 1, "events of different requests interleaved"
        text = "".join(e["choices"][0]["text"] for e in events)
        assert text == _reference(served, tokenizer.encode(prompts[i]), 24), i
        assert events[-1]["choices"][0]["finish_reason"] == "length"


BAD_BODIES = [
    (b"{not json", "json_invalid"),
    (b"[1, 2]", None),
    (json.dumps({"prompt": "w5", "temperature": "hot"}).encode(), None),
    (json.dumps({"prompt": "w5", "model": "gpt-4"}).encode(), "model_not_found"),
    (json.dumps({"prompt": "w5", "temperature": 2.5}).encode(), None),
    (json.dumps({"prompt": "w5", "top_p": 0}).encode(), None),
    (json.dumps({"prompt": "w5", "max_tokens": 0}).encode(), None),
    (json.dumps({"prompt": "w5", "n": 2}).encode(), "unsupported_parameter"),
    (json.dumps({"prompt": "w5", "logprobs": 3}).encode(), "unsupported_parameter"),
    (json.dumps({"prompt": "w5", "frequency_penalty": 0.5}).encode(), "unsupported_parameter"),
    (json.dumps({"prompt": "w5", "colour": "blue"}).encode(), None),
    (json.dumps({"prompt": " ".join(["w5"] * 2100)}).encode(), "context_length_exceeded"),
    (json.dumps({"prompt": "w5", "max_tokens": 5000}).encode(), "context_length_exceeded"),
    (json.dumps({"prompt": [5, 6, 100000]}).encode(), None),
    (json.dumps({"prompt": "", "max_tokens": 3}).encode(), None),
    (json.dumps({"prompt": "w5", "stop": ["a", "b", "c", "d", "e"]}).encode(), None),
    (json.dumps({"prompt": "w5", "stop": "x" * 257}).encode(), None),
    (json.dumps({"prompt": "w5", "top_k": 2**64}).encode(), None),
]


@pytest.mark.parametrize("body,code", BAD_BODIES)
def test_bad_requests_get_a_400_with_an_openai_error(server, body, code):
    response = httpx.post(server["url"] + "/v1/completions", content=body, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if code:
        assert error["code"] == code


def test_sampling_edges_never_restart_a_worker(server, served):
    """Every value the schema accepts is served (tiny temperatures decode greedily), every value
    it does not is a 400; none of them restarts a worker."""
    _, tokenizer, _ = served
    url, prompt = server["url"], _text_prompt(7)
    restarts = _metric(url, "dovetail_worker_restarts_total")
    greedy = _reference(served, tokenizer.encode(prompt), 8)
    for temperature in (5e-324, 1e-40, 1e-6):
        response = httpx.post(url + "/v1/completions", timeout=60, json={
            "prompt": prompt, "max_tokens": 8, "temperature": temperature, "seed": 3})
        assert response.status_code == 200, (temperature, response.text)
        assert response.json()["choices"][0]["text"] == greedy, temperature
    for fields in ({"top_k": 2**64}, {"top_k": VOCAB + 1}, {"seed": 2**64}, {"seed": -2**63 - 1}):
        response = httpx.post(url + "/v1/completions", timeout=60,
                              json={"prompt": prompt, "max_tokens": 4, "temperature": 0.7, **fields})
        assert response.status_code == 400, (fields, response.text)
    response = httpx.post(url + "/v1/completions", timeout=60, json={
        "prompt": prompt, "max_tokens": 4, "temperature": 0.7, "top_k": VOCAB, "seed": 2**63 - 1})
    assert response.status_code == 200, response.text
    assert _metric(url, "dovetail_worker_restarts_total") == restarts


def test_client_request_ids_are_echoed_never_shared(server, served):
    """Two concurrent streams with the same X-Request-Id each get their own answer (the header is
    echoed back; the engine's key is the server's own), and a retry with that id after a
    disconnect is served in full."""
    _, tokenizer, _ = served
    url = server["url"]
    prompts = [_text_prompt(300), _text_prompt(301)]
    results = {}

    def run(i, n=40):
        body = {"prompt": prompts[i], "max_tokens": n, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120,
                          headers={"X-Request-Id": "same-id"}) as response:
            results[i] = (", ".join(sorted(set(response.headers.get_list("x-request-id")))), _sse(response))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (header, events) in results.items():
        assert header == "same-id"
        assert "".join(e["choices"][0]["text"] for e in events) == _reference(served, tokenizer.encode(prompts[i]), 40)
    assert results[0][1][0]["id"] != results[1][1][0]["id"]
    body = {"prompt": prompts[0], "max_tokens": 300, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120,
                      headers={"X-Request-Id": "retry-id"}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # disconnect after the first event: the server cancels that request
    retry = httpx.post(url + "/v1/completions", timeout=120, headers={"X-Request-Id": "retry-id"},
                       json={"prompt": prompts[0], "max_tokens": 30, "temperature": 0})
    assert retry.status_code == 200 and retry.headers["x-request-id"] == "retry-id"
    assert retry.json()["choices"][0]["text"] == _reference(served, tokenizer.encode(prompts[0]), 30)


def test_a_huge_body_gets_a_413_at_once(server, served):
    """A 24 MB body is refused from its Content-Length, before it is read or parsed; meanwhile
    another stream goes on and stays exact."""
    _, tokenizer, _ = served
    url, prompt = server["url"], _text_prompt(9)
    results = {}

    def stream():
        body = {"prompt": prompt, "max_tokens": 60, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
            results["text"] = "".join(e["choices"][0]["text"] for e in _sse(response))

    other = threading.Thread(target=stream)
    other.start()
    huge = json.dumps({"prompt": "w5 " * (8 << 20)}).encode()
    assert len(huge) > 24 << 20
    t0 = time.perf_counter()
    try:
        response = httpx.post(url + "/v1/completions", content=huge, timeout=60,
                              headers={"content-type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    except httpx.WriteError:
        pass  # the server answered and closed before the client finished sending: refused all the same
    assert time.perf_counter() - t0 < 30
    other.join()
    assert results["text"] == _reference(served, tokenizer.encode(prompt), 60)


def test_chat_refusals_and_unknown_routes(server):
    url = server["url"]
    for body in ({"messages": []}, {"messages": [{"role": "robot", "content": "x"}]},
                 {"messages": [{"role": "user", "content": "w5"}], "tools": [{"type": "function"}]},
                 {"messages": [{"role": "user", "content": "w5"}], "logprobs": True}):
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 400 and "error" in response.json(), body
    missing = httpx.get(url + "/v2/nothing", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["message"]


def test_a_template_that_refuses_the_messages_is_a_400_and_restarts_nothing(server):
    """The served template raises on roles that do not alternate and trips the Jinja sandbox on
    'unsafe': each is the client's error (400, an OpenAI error body naming why), and the workers
    keep serving."""
    url = server["url"]
    restarts = _metric(url, "dovetail_worker_restarts_total")
    for messages, why in (([{"role": "user", "content": "w5"}, {"role": "user", "content": "w6"}],
                           "roles must alternate"),
                          ([{"role": "user", "content": "unsafe"}], "unsafe")):
        response = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 4}, timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["message"].startswith("the chat template refused these messages") and why in error["message"]
        assert error["param"] == "messages" and error["type"] == "invalid_request_error"
    fine = httpx.post(url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "w5"}], "max_tokens": 4, "temperature": 0})
    assert fine.status_code == 200
    assert _metric(url, "dovetail_worker_restarts_total") == restarts


def test_fuzzed_bodies_never_get_a_500(server):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-3, 40) | st.integers() | st.floats(allow_nan=False) \
        | st.text(max_size=12)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
    fields = st.sampled_from(["prompt", "messages", "model", "max_tokens", "temperature", "top_p", "top_k", "stop",
                              "seed", "stream", "n", "logprobs", "user", "speculate", "stream_options", "echo",
                              "max_completion_tokens", "tools", "response_format", "bogus"])
    good_messages = st.just([{"role": "user", "content": "w5 w6"}])
    bodies = st.dictionaries(fields, values | good_messages | st.just("w5 w6"), max_size=6)

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=bodies, chat=st.booleans(), raw=st.binary(max_size=40) | st.none())
    def check(body, chat, raw):
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 40:
            body["max_tokens"] = 10**7  # keep valid requests short: big budgets only as refusals
        content = raw if raw is not None else json.dumps(body).encode()
        response = httpx.post(server["url"] + path, content=content, timeout=120,
                              headers={"content-type": "application/json"})
        assert response.status_code < 500, (content, response.text)
        if response.status_code != 200:
            assert "error" in response.json()

    check()


def test_client_disconnect_cancels_its_request(server, served):
    """Five clients leave mid-stream, one after another: each request is cancelled, every worker
    drops its state (KV cache), and the server keeps answering (metrics included)."""
    url = server["url"]
    cancelled = _metric(url, "dovetail:request_success_total", 'finish_reason="cancelled"')
    body = {"prompt": "w7 w8", "max_tokens": 1900, "temperature": 0, "stream": True}
    for _ in range(5):
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
    deadline = time.monotonic() + 30
    while True:
        held = httpx.get(url + "/health", params={"workers": "true"}, timeout=30).json()["worker_requests"]
        if _metric(url, "dovetail:request_success_total", 'finish_reason="cancelled"') >= cancelled + 5 \
                and not any(held.values()):
            break
        assert time.monotonic() < deadline, f"disconnected requests not cancelled and freed: {held}"
        time.sleep(0.2)
    response = httpx.post(url + "/v1/completions", json={"prompt": "w7 w8", "max_tokens": 5, "temperature": 0},
                          timeout=60)
    assert response.status_code == 200


def _listeners(root_pid: int) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket that ``root_pid`` or a process under it
    listens on, as ``ss -ltnp`` reports them."""
    tree = {root_pid} | {p.pid for p in psutil.Process(root_pid).children(recursive=True)}
    found = set()
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        address, _, port = fields[3].rpartition(":")
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            if int(pid) in tree:
                found.add((address.strip("[]"), int(port), name))
    return found


def _beyond_loopback(listeners) -> set:
    return {entry for entry in listeners if entry[0] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")}


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_a_default_serve_listens_on_loopback_only(server):
    """Ray's GCS, raylet, agents, workers and Serve's proxy: all on loopback."""
    listeners = _listeners(server["proc"].pid)
    names = {name for *_, name in listeners}
    assert len(listeners) >= 6 and {"gcs_server", "raylet"} <= names, listeners  # Ray's servers were seen
    assert not _beyond_loopback(listeners), _beyond_loopback(listeners)


def _routable_address() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def _dovetail_processes():
    names = ("ServeReplica", "Coordinator", "TargetShard", "DraftWorker")
    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        for name in names:
            if cmd.startswith(f"ray::{name}"):
                found[f"{name}-{proc.pid}"] = proc
    return found


def test_health_is_503_while_the_engine_cannot_serve(server, served):
    """A worker that dies while the engine is idle makes /health answer 503, and that health check
    starts replacing it (a restart, counted in dovetail_worker_restarts_total); a request sent
    meanwhile waits for the new group and runs normally; then /health is 200 again."""
    _, tokenizer, _ = served
    url = server["url"]
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    restarts = _metric(url, "dovetail_worker_restarts_total")
    draft = next(p for name, p in _dovetail_processes().items() if name.startswith("DraftWorker"))
    draft.send_signal(signal.SIGKILL)
    draft.wait(30)
    deadline = time.monotonic() + 30
    while httpx.get(url + "/health", timeout=30).status_code != 503:
        assert time.monotonic() < deadline, "/health still says ok with a dead worker"
        time.sleep(0.5)
    prompt = _text_prompt(5)
    after = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 10, "temperature": 0},
                       timeout=120)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == _reference(
        served, tokenizer.encode(prompt), 10)
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    assert _metric(url, "dovetail_worker_restarts_total") == restarts + 1


def test_memory_stays_flat_over_200_requests(server):
    url = server["url"]
    body = {"prompt": "w11 w12 w13", "max_tokens": 8, "temperature": 0}

    def rss():
        return {name: p.memory_info().rss for name, p in _dovetail_processes().items()}

    with httpx.Client(timeout=60) as client:
        for _ in range(30):  # warm-up: allocator pools, caches
            assert client.post(url + "/v1/completions", json=body).status_code == 200
        before = rss()
        for _ in range(200):
            assert client.post(url + "/v1/completions", json=body).status_code == 200
        after = rss()
    assert len(before) >= 4, before
    growth = {name: (after[name] - before[name]) / 2**20 for name in before if name in after}
    print("RSS growth MiB", growth)
    assert max(growth.values()) < 16, f"RSS grew (MiB): {growth}"


def test_killed_shard_under_load_fails_only_its_batch(server, served):
    """Six streams at once on the server's batch (``auto``: as /health says, with why); the shard
    dies while the first batch decodes: those requests get an error event, the queued ones are
    served exactly by the restarted workers, and so is a later request."""
    _, tokenizer, _ = served
    url = server["url"]
    health = httpx.get(url + "/health", timeout=30).json()
    batch = health["max_batch"]
    assert batch >= 1 and health["max_batch_why"].startswith("auto: "), health
    shard = next(p for name, p in _dovetail_processes().items() if name.startswith("TargetShard"))
    prompts = [_text_prompt(100 + i) for i in range(6)]
    results: dict[int, list[dict]] = {}
    first_token = threading.Event()

    def run(i):
        body = {"prompt": prompts[i], "max_tokens": 300, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as response:
            events = []
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                    first_token.set()
            results[i] = events

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    assert first_token.wait(60)
    shard.send_signal(signal.SIGKILL)
    for t in threads:
        t.join()
    failed = [i for i, events in results.items() if "error" in events[-1]]
    assert 1 <= len(failed) <= batch and len(results) == 6, failed
    assert all("target shard 0" in results[i][-1]["error"]["message"] for i in failed)
    for i, events in results.items():
        if i not in failed:
            text = "".join(e["choices"][0]["text"] for e in events)
            assert text == _reference(served, tokenizer.encode(prompts[i]), 300), i
    after = httpx.post(url + "/v1/completions", json={"prompt": prompts[0], "max_tokens": 10, "temperature": 0},
                       timeout=120)
    assert after.status_code == 200
    assert after.json()["choices"][0]["text"] == _reference(served, tokenizer.encode(prompts[0]), 10)


def test_admission_is_fifo_by_slots_and_kv_bytes_and_survives_cancellation():
    """Each user holds its admission until the test releases it, so the order is decided by
    events alone, never by how fast the machine runs the tasks."""
    import asyncio

    from dovetail.serve.edge import FifoAdmission

    async def settle():
        """Every task runs until it waits for something the test has not done yet."""
        for _ in range(20):
            await asyncio.sleep(0)

    async def scenario():
        admission, order, release = FifoAdmission(slots=2, budget=100), [], {}

        def user(name, cost):
            release[name] = asyncio.Event()

            async def hold():
                async with admission.take(cost):
                    order.append(name)
                    await release[name].wait()

            return asyncio.create_task(hold())

        def finish(*names):
            for name in names:
                release[name].set()

        first = [user(n, 10) for n in ("a", "b")]
        await settle()
        waiting = [user(n, 10) for n in ("c", "d", "e")]
        await settle()
        assert order == ["a", "b"] and len(admission.waiters) == 3
        waiting[1].cancel()  # "d" leaves the queue (its client went away)
        await settle()
        finish("a", "b", "c", "e")
        await asyncio.gather(*first, waiting[0], waiting[2])
        assert order == ["a", "b", "c", "e"]
        assert admission.slots == 2 and admission.budget == 100 and not admission.waiters

        # KV bytes: "big" (70) waits for "f" (40) to finish although a slot is free, and "g" (10),
        # which would fit, waits behind it (no overtaking); when "big" leaves, "g" goes at once.
        order.clear()
        f = user("f", 40)
        await settle()
        big, g = user("big", 70), user("g", 10)
        await settle()
        assert order == ["f"] and admission.slots == 1 and admission.budget == 60
        finish("f")
        await settle()
        assert order == ["f", "big", "g"]  # both fit once "f" is gone, and "big" goes first
        finish("big", "g")
        await asyncio.gather(f, big, g)
        h = user("h", 95)
        await settle()
        big, g = user("big", 70), user("g", 5)
        await settle()
        assert order[-1] == "h" and len(admission.waiters) == 2
        big.cancel()
        await settle()
        assert order[-1] == "g" and not admission.waiters  # the cancelled head no longer holds "g" back
        finish("h", "g")
        await asyncio.gather(h, g)
        assert admission.slots == 2 and admission.budget == 100

    asyncio.run(scenario())


def _network_and_kv_checks(proc, port: int) -> None:
    """For the YAML server: only its HTTP port listens beyond loopback; /health and /metrics answer
    loopback clients only; admission holds a request until its worst-case KV fits."""
    key = {"Authorization": "Bearer test-key"}
    if shutil.which("ss"):
        assert {p for _, p, _ in _beyond_loopback(_listeners(proc.proc.pid))} == {port}
    routable = _routable_address()
    if routable:
        outside = f"http://{routable}:{port}"
        for route in ("/health", "/metrics"):
            refused = httpx.get(outside + route, timeout=30)
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden", route
            assert httpx.get(proc.url + route, timeout=30).status_code == 200, route
        response = httpx.post(outside + "/v1/completions", json={"prompt": "w5", "max_tokens": 3}, headers=key,
                              timeout=60)
        assert response.status_code == 200
    never = httpx.post(proc.url + "/v1/completions", json={"prompt": "w5", "max_tokens": 1500}, headers=key,
                       timeout=60)
    assert never.status_code == 400 and never.json()["error"]["code"] == "kv_budget_exceeded", never.text
    chat = httpx.post(proc.url + "/v1/chat/completions", headers=key, timeout=120,
                      json={"messages": [{"role": "user", "content": "w5"}], "temperature": 0})
    assert chat.status_code == 200 and 0 < chat.json()["usage"]["completion_tokens"] <= 1024  # default within KV
    # two requests of ~600 tokens each: a slot is free for the second, but not its KV; it waits
    results = []

    def long(i):
        results.append(httpx.post(proc.url + "/v1/completions", headers=key, timeout=300,
                                  json={"prompt": f"w{5 + i}", "max_tokens": 600, "temperature": 0}).status_code)

    threads = [threading.Thread(target=long, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    held, deadline = False, time.monotonic() + 60
    while not held and any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        health = httpx.get(proc.url + "/health", timeout=30).json()
        held = health["running"] == 1 and health["waiting"] == 1
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert held, "the second request was not held back by the KV budget"
    assert results == [200, 200]


def test_serve_run_with_the_shipped_yaml(served, serve_process, tmp_path):
    """`serve run deploy/serve.yaml` (Ray Serve's own CLI), the YAML pointed at the tiny models,
    opened to the network (``host: 0.0.0.0``) with an API key, a small queue and a 1 MiB KV budget
    (about 1000 tokens of these models' keys and values)."""
    import yaml

    _, tokenizer, root = served
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "serve.yaml").read_text())
    app = config["applications"][0]
    app["args"].update(target=str(root / "target"), draft=str(root / "draft"), draft_precision="fp32",
                       api_key="test-key", max_queued_requests=2, max_batch=2, kv_memory_mb=1)
    port = free_port()
    config["http_options"].update(port=port, host="0.0.0.0")
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"DOVETAIL_HOME": str(tmp_path / "home"), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # as the README says
    serve_run = [sys.executable, "-c", "from ray.serve.scripts import cli; cli()", "run", str(path)]
    with serve_process([], "serve-run", port=port, command=serve_run, env=env) as proc:
        _network_and_kv_checks(proc, port)
        body = {"prompt": "w5 w6", "max_tokens": 6, "temperature": 0}
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "test-key"}):
            refused = httpx.post(proc.url + "/v1/completions", json=body, headers=headers, timeout=60)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key", headers
        assert httpx.get(proc.url + "/v1/models", timeout=30).status_code == 401
        assert httpx.get(proc.url + "/health", timeout=30).status_code == 200  # stays open
        response = httpx.post(proc.url + "/v1/completions", json=body, timeout=60,
                              headers={"Authorization": "Bearer test-key"})
        assert response.status_code == 200
        # overload: 8 clients at once against a batch of 2 and a queue of 2 -> the excess gets 429s;
        # a 24 MB body meanwhile gets a 413; a stream already running keeps its pace and its text
        statuses, gaps, streamed, first_token = [], [], {}, threading.Event()

        def stream():
            body = {"prompt": "w7 w8", "max_tokens": 300, "temperature": 0, "stream": True}
            with httpx.stream("POST", proc.url + "/v1/completions", json=body, timeout=120,
                              headers={"Authorization": "Bearer test-key"}) as response:
                last, text = None, ""
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        now = time.perf_counter()
                        gaps.append(now - last if last else 0.0)
                        last, text = now, text + json.loads(line[6:])["choices"][0]["text"]
                        first_token.set()
                streamed["text"] = text

        def client():
            r = httpx.post(proc.url + "/v1/completions", timeout=120, headers={"Authorization": "Bearer test-key"},
                           json={"prompt": "w5 w6", "max_tokens": 200, "temperature": 0})
            statuses.append((r.status_code, r.headers.get("retry-after")))

        running = threading.Thread(target=stream)
        running.start()
        assert first_token.wait(120), "the stream never started"
        clients = [threading.Thread(target=client) for _ in range(8)]
        for c in clients:
            c.start()
        huge = httpx.post(proc.url + "/v1/completions", content=b"{" + b" " * (24 << 20) + b"}", timeout=60,
                          headers={"content-type": "application/json", "Authorization": "Bearer test-key"})
        assert huge.status_code == 413
        for c in clients + [running]:
            c.join()
        assert streamed["text"] == _reference(served, tokenizer.encode("w7 w8"), 300)
        assert max(gaps) < 2.0, f"the running stream stalled for {max(gaps):.2f} s under overload"
        assert sorted({code for code, _ in statuses}) == [200, 429], statuses
        assert all(after == "1" for code, after in statuses if code == 429)
        assert sum(code == 200 for code, _ in statuses) >= 3  # the stream's free batch slot and the queue
        assert response.json()["choices"][0]["text"] == _reference(served, tokenizer.encode("w5 w6"), 6)
        assert response.json()["model"] == "target"


def _orphans(home: Path) -> list[str]:
    """Segments and run directories whose owner process is dead."""
    from dovetail.protocol.shm import PREFIX, pid_alive

    names = [s[len(PREFIX):] for s in _segments()]
    for runs in (home / "run", Path(f"/tmp/dovetail-{os.getuid()}-run")):
        if runs.is_dir():
            names += [p.name for p in runs.iterdir()]
    return [n for n in names if n.split("_")[0].isdigit() and not pid_alive(int(n.split("_")[0]))]


@pytest.mark.slow
def test_crash_matrix(served, serve_process, tmp_path):
    """SIGKILL the coordinator, shard 0, shard 1, the draft and the replica, 20 times in all, each at
    a random phase of a streaming request. The request in flight ends (an error is fine, a hang is
    not); the next request is exact; nothing of a dead process is left behind."""
    import random

    _, tokenizer, root = served
    home = tmp_path / "home"
    args = ["--target", str(root / "target"), "--draft", str(root / "draft"), "--draft-precision", "fp32",
            "--sockets", "0|1"]
    rng, victims, outcomes = random.Random(0), ["Coordinator", "TargetShard", "TargetShard", "DraftWorker",
                                                 "ServeReplica"], []
    with serve_process(args, "crash", env={"DOVETAIL_HOME": str(home)}) as proc:
        url = proc.url
        for kill in range(20):
            victim = victims[kill % len(victims)]
            pids = sorted(p.pid for name, p in _dovetail_processes().items() if name.startswith(victim))
            pid = pids[kill % len(pids)]  # the two shards in turn
            result = {}

            def stream():
                try:
                    with httpx.stream("POST", url + "/v1/completions", timeout=120,
                                      json={"prompt": _text_prompt(kill), "max_tokens": 300, "stream": True}) as r:
                        body = r.read()
                        done = r.status_code == 200 and b"[DONE]" in body and b'"error"' not in body
                        result["status"] = "complete" if done else f"{r.status_code}, failed in the stream"
                except httpx.HTTPError as exc:
                    result["status"] = type(exc).__name__

            client = threading.Thread(target=stream)
            client.start()
            time.sleep(rng.uniform(0.0, 0.8))  # admission, prefill, decoding, or already done
            os.kill(pid, signal.SIGKILL)
            client.join(150)
            assert not client.is_alive(), f"kill {kill} ({victim}): the request in flight hung"
            outcomes.append((victim, result.get("status")))
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(url + "/health", timeout=10).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"kill {kill} ({victim}): the server did not recover"
                time.sleep(0.5)
            prompt = _text_prompt(kill + 1)
            after = httpx.post(url + "/v1/completions", timeout=120,
                               json={"prompt": prompt, "max_tokens": 12, "temperature": 0})
            assert after.status_code == 200, (kill, victim, after.text)
            assert after.json()["choices"][0]["text"] == _reference(served, tokenizer.encode(prompt), 12), kill
            deadline = time.monotonic() + 30
            while _orphans(home) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not _orphans(home), (kill, victim, _orphans(home))
        assert proc.stop() == 0
    print("crash matrix outcomes:", outcomes)
