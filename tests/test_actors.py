"""The Ray actor system, with real processes: exact output, sampling, failures, no leaks.

One Ray instance serves the module; each engine is a coordinator + draft + shard actors.
"""

import os
import signal
import time

import pytest
import ray
import torch

from dovetail.actors.system import _wait_for_exit
from dovetail.config import EngineConfig
from dovetail.request import Failed, Finished, Request, Tokens
from dovetail.errors import EngineError
from dovetail.protocol import messages as m
from dovetail.protocol.shm import PREFIX, segment_names as _segments
from dovetail.sampling import SamplingParams
from test_sampling import PARAMS, PROMPT, chi_square_pvalue, exact_joint, sample_counts
from tiny_models import actor_engine, hf_greedy, perturbed, tiny_model

EOS = 1


def _save_pair(root, target, draft):
    for name, model in (("target", target), ("draft", draft)):
        model.generation_config.eos_token_id = EOS
        model.save_pretrained(root / name)
    return root / "target", root / "draft"


def _engine(target_dir, draft_dir, tree, sockets, eos=EOS):
    config = EngineConfig(target=str(target_dir), draft=str(draft_dir), tree=tree, sockets=sockets,
                          draft_precision="fp32")
    return actor_engine(target_dir, draft_dir, config, [eos])


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    target = tiny_model("qwen2", seed=7, num_key_value_heads=2)
    return target, _save_pair(tmp_path_factory.mktemp("qwen"), target, perturbed(target, 0.02, seed=8))


def _prompts():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 96, (n,), generator=gen).tolist() for n in (1, 7, 30)]


def _next_request_is_exact(engine, target):
    prompt = _prompts()[1]
    assert engine.generate(prompt, 30).token_ids == hf_greedy(target, prompt, 30, eos=EOS)


def _concurrently(fn, n: int) -> dict:
    """``{i: fn(i)}`` for i < n, each call in its own thread, all at once."""
    import threading

    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, fn(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _live_requests(engine, settle_s: float = 5.0) -> dict:
    """Requests each worker still holds state for. A request's end reaches every worker as a
    message of its own, after the caller has its last event: wait up to ``settle_s`` for the
    workers to read it (a worker that never frees a request still fails)."""
    deadline = time.monotonic() + settle_s
    while True:
        workers = ray.get(engine.coordinator.info.remote(refresh=True))["workers"]
        live = {name: w["live_requests"] for name, w in workers.items()}
        if not any(live.values()) or time.monotonic() > deadline:
            return live
        time.sleep(0.05)


@pytest.mark.parametrize("sockets,tree", [("0", "chain:3"), ("0|1", "8,4,2")], ids=["1-shard-chain", "2-shards-tree"])
def test_greedy_identical_to_target(ray_session, qwen_pair, sockets, tree):
    target, (target_dir, draft_dir) = qwen_pair
    engine = _engine(target_dir, draft_dir, tree, sockets)
    try:
        held = 0
        for prompt in _prompts():
            expected = hf_greedy(target, prompt, 40, eos=EOS)
            for pipeline in (True, False):
                result = engine.generate(prompt, 40, pipeline=pipeline)
                assert result.token_ids == expected, (prompt, pipeline)
                held += result.stats.bets_held
            off = engine.generate(prompt, 40, speculate=False)
            assert off.token_ids == expected and off.stats.mean_accepted == 1.0
        assert held > 0, "no bet ever held: the pipelined path was not exercised"
    finally:
        engine.shutdown()
    assert _segments() <= ray_session


def test_sampling_matches_target_distribution(ray_session, tmp_path):
    """Two shards (each samples with the shared seed) and a draft that samples its trees (no
    caller's seed: q travels with each tree): the joint of 3 sampled tokens fits the target's
    exact distribution; a caller's seed still reproduces its output."""
    target = tiny_model("llama", seed=11, vocab_size=8, initializer_range=0.5, num_hidden_layers=1)
    target_dir, draft_dir = _save_pair(tmp_path, target, perturbed(target, 0.6, seed=12))
    engine = _engine(target_dir, draft_dir, "chain:3", "0|1", eos=-1)  # count every sequence: no early stop
    try:
        n = 800
        counts = sample_counts(engine, SamplingParams(**PARAMS), n, seeded=False)
        assert chi_square_pvalue(counts, exact_joint(target, SamplingParams(**PARAMS)), n) > 1e-3
        seeded = SamplingParams(**PARAMS, seed=5)
        assert engine.generate(PROMPT, 10, seeded).token_ids == engine.generate(PROMPT, 10, seeded).token_ids
    finally:
        engine.shutdown()


@pytest.mark.parametrize("victim", ["target shard 1", "draft"])
@pytest.mark.parametrize("when", ["mid-request", "between-requests"])
def test_killed_worker_fails_the_request_then_recovers(ray_session, qwen_pair, victim, when):
    """A worker killed during a request fails that request clearly, and the group is restarted; one
    killed while idle is replaced before the next request starts, which then runs normally. Either
    way the next request is exact and the dead worker's segment is gone."""
    target, (target_dir, draft_dir) = qwen_pair
    engine = _engine(target_dir, draft_dir, "chain:3", "0|1", eos=-1)
    try:
        pid = engine.info["workers"][victim]["pid"]
        killed = []

        def kill_once(tokens=None):
            if not killed:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        generation = ray.get(engine.coordinator.info.remote())["generation"]
        if when == "between-requests":
            kill_once()
            _wait_for_exit([pid], timeout_s=10)
            _next_request_is_exact(engine, target)
        else:
            with pytest.raises(EngineError, match=f"{victim}.*restarted"):
                engine.generate([5, 6, 7], 400, on_tokens=kill_once)  # killed at the first token
        assert ray.get(engine.coordinator.info.remote())["generation"] == generation + 1
        assert not [s for s in _segments() if s.startswith(f"{PREFIX}{pid}_")], "the dead worker's segment leaked"
        _next_request_is_exact(engine, target)
    finally:
        engine.shutdown()
    assert _segments() <= ray_session


@pytest.fixture(scope="module")
def feature_pair(tmp_path_factory):
    """A target whose next token depends on the current one, and a Dovetail drafter trained on it."""
    from test_drafter import SETTINGS, drafter_for, greedy_windows
    from dovetail.training.features import dump_features
    from dovetail.training.trainer import train_drafter

    root = tmp_path_factory.mktemp("feature")
    target = tiny_model("qwen2", seed=3, num_key_value_heads=2, initializer_range=0.6)
    with torch.no_grad():
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    target.generation_config.eos_token_id = EOS
    target.save_pretrained(root / "target")
    drafter = drafter_for(target)
    train_drafter(drafter, dump_features(target, greedy_windows(target, 48, 32, 0), root / "dump", batch=8),
                  SETTINGS, root / "train")
    drafter.save(root / "drafter", {"hidden_size": 64})
    return target, root / "target", root / "drafter"


def test_feature_drafter_through_the_protocol(ray_session, feature_pair):
    """The Dovetail drafter in the draft actor, fed the shards' features over shared memory:
    exact output over 2 shards, features only of committed positions, no leaked segment."""
    target, target_dir, drafter_dir = feature_pair
    engine = _engine(target_dir, drafter_dir, "6,3,2", "0|1")
    try:
        accepted = 0
        for prompt in _prompts():
            result = engine.generate(prompt, 30)
            assert result.token_ids == hf_greedy(target, prompt, 30, eos=EOS)
            assert not result.stats.pipelined and result.stats.bets == 0
            accepted += sum(result.stats.accepted_per_step)
            # per step: tree arrays + ids + (accepted + 1) feature rows of 64 fp32 values
            assert result.stats.bytes_draft_target >= 4 * 64 * (result.stats.steps - 1)
        assert accepted > 10
    finally:
        engine.shutdown()
    assert _segments() <= ray_session


def test_feature_drafter_batched_and_betting_through_the_actors(ray_session, feature_pair):
    """The feature drafter in a batch of 3 (each tree from its own request's features, sent in one
    ProposeBatch) while betting (Predraft carries the settled tokens' features): every request is
    the target's greedy output, one runs without speculation, bets both hold and miss, and every
    worker drops every request's state. Prompts joining the batch go in by chunks of 4 tokens
    (``PrefillChunk``), their features gathered for the drafter."""
    target, target_dir, drafter_dir = feature_pair
    config = EngineConfig(target=str(target_dir), draft=str(drafter_dir), tree="6,3,2", sockets="0", max_batch=3,
                          prefill_chunk=4)
    engine = actor_engine(target_dir, drafter_dir, config, [EOS])
    prompts = _prompts() + [[9, 8, 7, 6]]
    try:
        results = _concurrently(lambda i: engine.generate(prompts[i], 30, speculate=i != 1, pipeline=True), len(prompts))
        for i, prompt in enumerate(prompts):
            assert results[i].token_ids == hf_greedy(target, prompt, 30, eos=EOS), i
        assert results[1].stats.mean_accepted == 1.0 and results[1].stats.bets == 0
        drafted = [results[i].stats for i in (0, 2, 3)]
        assert all(s.pipelined and s.bets == s.steps for s in drafted)
        held = sum(s.bets_held for s in drafted)
        assert 0 < held < sum(s.bets for s in drafted), "bets should both hold and miss"
        assert sum(sum(s.accepted_per_step) for s in drafted) > 10
        assert set(_live_requests(engine).values()) == {0}
    finally:
        engine.shutdown()
    assert _segments() <= ray_session


@pytest.mark.parametrize("sockets", ["0", "0|1"], ids=["1-shard", "2-shards"])
def test_batched_requests_are_exact_and_free_their_caches(ray_session, qwen_pair, sockets):
    """Batch mode: six concurrent requests (more than the batch of 3) each get exactly the target's
    greedy output; one switches speculation off, one is cancelled; the batch verifies several
    trees per forward and every worker drops every request's state at the end. A prompt joining
    the batch goes in by chunks of 4 tokens (``PrefillChunk``), one per step."""
    target, (target_dir, draft_dir) = qwen_pair
    config = EngineConfig(target=str(target_dir), draft=str(draft_dir), tree="chain:3", sockets=sockets,
                          draft_precision="fp32", max_batch=3, prefill_chunk=4)
    engine = actor_engine(target_dir, draft_dir, config, [EOS])
    prompts = _prompts() + [[9, 8, 7, 6], [50] * 12, list(range(10, 30))]
    try:
        results = _concurrently(lambda i: engine.generate(prompts[i], 40, speculate=i != 4), len(prompts))
        for i, prompt in enumerate(prompts):
            assert results[i].token_ids == hf_greedy(target, prompt, 40, eos=EOS), i
        assert results[4].stats.mean_accepted == 1.0 and results[0].stats.mean_accepted > 1.0
        # a prompt whose greedy answer runs 220 tokens before EOS, so the request is still decoding when
        # the cancel arrives (a short answer, such as [5, 6, 7]'s 3 tokens, can finish first)
        long_prompt = [9, 8, 7, 6]
        full = len(hf_greedy(target, long_prompt, 400, eos=EOS))
        assert full > 100
        stream = iter(engine.submit(Request(long_prompt, 400, request_id="to-cancel")))
        first = next(stream)
        engine.cancel("to-cancel")
        final = list(stream)[-1]
        assert isinstance(first, Tokens) and first.ids and final.cancelled and final.stats.new_tokens < full
        live = _live_requests(engine)
        assert set(live.values()) == {0}, live
        workers = ray.get(engine.coordinator.info.remote(refresh=True))["workers"]
        assert all(w["prefill_chunks"] > 0 for name, w in workers.items() if name.startswith("target")), workers
    finally:
        engine.shutdown()
    assert _segments() <= ray_session


@pytest.mark.parametrize("sockets", ["0", "0|1"], ids=["1-shard", "2-shards"])
def test_quantized_target_through_the_actors(ray_session, tmp_path, sockets):
    """A native GGUF target (Q4_K/Q6_K/Q5_0/Q4_0 mix; its MLP of 3 super-blocks splits 2 + 1 over
    two shards) with an int4 draft: speculative output equals the same engine's plain decoding,
    pipelined or not, one request at a time or batched; one shard equals the in-process target."""
    from dovetail.models.quantized import load_quantized
    from test_greedy_identity import make_engine
    from test_quantized import gguf_model

    model, folder, _ = gguf_model(tmp_path, seed=6)
    perturbed(model, 0.02, seed=8).save_pretrained(tmp_path / "draft")
    config = EngineConfig(target=str(folder), draft=str(tmp_path / "draft"), tree="8,4,2", sockets=sockets,
                          draft_precision="int4", max_batch=1)
    engine = actor_engine(folder, tmp_path / "draft", config, [EOS])
    prompts = _prompts()
    try:
        assert engine.target_precision == "native"
        plain = [engine.generate(p, 40, speculate=False).token_ids for p in prompts]
        if sockets == "0":
            alone = make_engine(load_quantized(folder, "native"), None, config.tree)
            assert plain == [alone.generate(p, 40).token_ids for p in prompts]
        accepted = 0
        for prompt, expected in zip(prompts, plain):
            for pipeline in (True, False):
                result = engine.generate(prompt, 40, pipeline=pipeline)
                assert result.token_ids == expected, (prompt, pipeline)
                accepted += sum(result.stats.accepted_per_step)
        assert accepted > 0
    finally:
        engine.shutdown()
    config.max_batch = 3
    engine = actor_engine(folder, tmp_path / "draft", config, [EOS])
    try:
        results = _concurrently(lambda i: engine.generate(prompts[i], 40), len(prompts))
        assert [results[i].token_ids for i in range(len(prompts))] == plain
    finally:
        engine.shutdown()
    assert _segments() <= ray_session


def _raw(engine, prompt, max_new, sampling=None, speculate=True):
    """A request straight to the coordinator, past the driver's validation (as a request whose own
    computation fails would reach it); returns (tokens, final item)."""
    sampling = sampling or dict(temperature=0.0, top_p=1.0, top_k=0, seed=1)
    tokens = []
    request = Request(prompt, max_new, SamplingParams(**sampling), speculate, pipeline=True)
    feed = engine._feeds.open(request.request_id)
    last = ray.get(engine.coordinator.run.remote(request, engine._feeds.address))
    for item in feed:
        if isinstance(item, Tokens):
            tokens.extend(item.ids)
        else:
            assert item == last  # the call returns the request's last event too
            return tokens, item


@pytest.mark.parametrize("sockets", ["0", "0|1"], ids=["1-shard", "2-shards"])
def test_a_request_error_fails_that_request_alone(ray_session, qwen_pair, sockets):
    """An error in one request's own computation (a token id past the vocabulary: the shard's or the
    draft's embedding raises) or in encoding its messages (top_k 2**64 overflows msgpack) ends that
    request with a clear error; the workers are not restarted and keep no state of it."""
    target, (target_dir, draft_dir) = qwen_pair
    engine = _engine(target_dir, draft_dir, "chain:3", sockets)
    try:
        generation = ray.get(engine.coordinator.info.remote())["generation"]
        _, final = _raw(engine, [5, 6, 10**6], 20)
        assert isinstance(final, Failed) and "restarted" not in final.error, final
        _, final = _raw(engine, [5, 6, 7], 20, dict(temperature=0.5, top_p=1.0, top_k=2**64, seed=1))
        assert isinstance(final, Failed) and "restarted" not in final.error, final
        assert ray.get(engine.coordinator.info.remote())["generation"] == generation, "the workers were restarted"
        assert set(_live_requests(engine).values()) == {0}
        _next_request_is_exact(engine, target)
    finally:
        engine.shutdown()
    assert _segments() <= ray_session


def test_a_failing_request_in_a_batch_fails_alone(ray_session, qwen_pair):
    """Batch mode, four concurrent requests, one of which fails inside the workers: the other three
    are exact, nothing is restarted, and every worker's live-request count returns to 0."""
    target, (target_dir, draft_dir) = qwen_pair
    config = EngineConfig(target=str(target_dir), draft=str(draft_dir), tree="chain:3", sockets="0",
                          draft_precision="fp32", max_batch=4)
    engine = actor_engine(target_dir, draft_dir, config, [EOS])
    prompts = _prompts() + [[9, 8, 7, 6]]
    bad = 2
    prompts[bad] = prompts[bad] + [10**6]
    try:
        generation = ray.get(engine.coordinator.info.remote())["generation"]
        results = _concurrently(lambda i: _raw(engine, prompts[i], 40), len(prompts))
        for i, prompt in enumerate(prompts):
            tokens, final = results[i]
            if i == bad:
                assert isinstance(final, Failed), final
            else:
                assert isinstance(final, Finished) and tokens == hf_greedy(target, prompt, 40, eos=EOS), i
        assert ray.get(engine.coordinator.info.remote())["generation"] == generation
        assert set(_live_requests(engine).values()) == {0}
    finally:
        engine.shutdown()
    assert _segments() <= ray_session


def _on_coordinator(engine, fn):
    """Run ``fn(coordinator)`` inside the coordinator's process (fault injection); this module's
    functions travel by value, since the workers cannot import the tests."""
    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray.get(engine.coordinator.__ray_call__.remote(fn))


def _on_worker(engine, index: int, fn):
    """Run ``fn(worker)`` inside worker ``index`` (shards first, then the draft)."""
    actor = _on_coordinator(engine, lambda c: c._inboxes()[index].actor)
    return ray.get(actor.__ray_call__.remote(fn))


def _drop_verify_replies(shard):
    """From now on this shard computes no verification and sends no reply (a lost message)."""
    shard.handlers = {**type(shard).handlers, m.VerifyTree: "_ignore", m.VerifyBatch: "_ignore"}
    shard._ignore = lambda msg: None


def _skew_verify_replies(shard):
    """From now on this shard's verification replies speak another protocol version."""
    import msgpack

    send = shard.channel.send

    def skewed(msg):
        if isinstance(msg, m.Accepted) and msg.step > 0:
            body = msgpack.unpackb(m.encode(msg))
            body["v"] = m.PROTOCOL_VERSION + 1
            return shard.channel.send_raw(msgpack.packb(body))
        return send(msg)

    shard.channel.send = skewed


def _heal(shard):
    shard.__dict__.pop("handlers", None)
    shard.__dict__.pop("_ignore", None)
    shard.channel.__dict__.pop("send", None)


def test_a_lost_or_skewed_reply_ends_its_request_at_the_deadline(ray_session, qwen_pair):
    """Shard 0's verification reply never arrives (or arrives in another protocol version, which
    the coordinator drops) while its pings still succeed: the request fails when its step deadline
    passes, not never; nothing is restarted, no state is left, and the next request is exact."""
    import dataclasses
    import time

    target, (target_dir, draft_dir) = qwen_pair
    engine = _engine(target_dir, draft_dir, "chain:3", "0")
    try:
        _on_coordinator(engine, lambda c: setattr(c, "spec", dataclasses.replace(c.spec, step_timeout_s=2.0)))
        generation = ray.get(engine.coordinator.info.remote())["generation"]
        for fault in (_drop_verify_replies, _skew_verify_replies):
            _on_worker(engine, 0, fault)
            t0 = time.monotonic()
            _, final = _raw(engine, [5, 6, 7], 20)
            assert isinstance(final, Failed) and "within 2 s" in final.error, (fault.__name__, final)
            assert time.monotonic() - t0 < 30
            assert ray.get(engine.coordinator.info.remote())["generation"] == generation, "the workers were restarted"
            _on_worker(engine, 0, _heal)
            assert set(_live_requests(engine).values()) == {0}
            _next_request_is_exact(engine, target)
    finally:
        engine.shutdown()
    assert _segments() <= ray_session


def test_workers_at_another_protocol_version_are_refused_at_start(ray_session, qwen_pair):
    """ready() checks every worker's protocol version: a restart into a mismatched group fails with
    a clear error naming the version, and the coordinator keeps answering."""
    _, (target_dir, draft_dir) = qwen_pair
    engine = _engine(target_dir, draft_dir, "chain:3", "0")
    try:
        other = m.PROTOCOL_VERSION + 1

        def restart_at_another_version(c):
            import dovetail.actors.coordinator as coordinator

            coordinator.PROTOCOL_VERSION = other
            try:
                c.restart_workers()
            except RuntimeError as exc:
                return str(exc)
            finally:
                coordinator.PROTOCOL_VERSION = m.PROTOCOL_VERSION
            return "no error"

        message = _on_coordinator(engine, restart_at_another_version)
        assert f"protocol version mismatch (coordinator: {other})" in message and f"speaks {m.PROTOCOL_VERSION}" in message
        assert ray.get(engine.coordinator.ping.remote())
    finally:
        engine.shutdown()
    assert _segments() <= ray_session


def test_socket_dirs_leave_room_for_rays_own_socket_paths(monkeypatch):
    """Ray puts "/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store" (64 bytes) under its
    temp dir, and a unix socket path holds 107: a home whose ``ray`` dir is 48 bytes long (a longer
    TMPDIR under pytest) would make every server start fail; such a dir moves to a short /tmp path."""
    import shutil
    from pathlib import Path

    from dovetail.actors.system import short_dir

    session = "/session_2026-12-03_06-16-50_480238_1234567/sockets/plasma_store"
    home = Path("/tmp") / ("dovetail-test-" + "x" * (48 - len("/tmp/dovetail-test-/ray")))
    assert len(str(home / "ray")) == 48
    monkeypatch.setenv("DOVETAIL_HOME", str(home))
    try:
        assert len(str(short_dir("ray")) + session) <= 107
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_a_draft_that_takes_turns_finishes_its_prefill_before_the_target_is_sent_work():
    """On shared CPUs the draft's prefill is sent without waiting, but the shards get no compute
    until the draft has answered a Sync (or a later reply showed it caught up): the two never
    prefill at once. EndRequest needs no turn."""
    import numpy as np

    from dovetail.actors.remote import DraftTurns, RemoteProposer, RemoteVerifier
    from dovetail.models.tree import DraftTree
    from dovetail.sampling import SamplingParams

    class Arena:
        def put(self, array):
            return m.ArrayRef("seg", 0, str(np.asarray(array).dtype), list(np.shape(array)))

    class Link:
        draft, shards, arena = "draft", ["shard"], Arena()

        def __init__(self):
            self.log = []

        def send(self, box, msg):
            self.log.append((box, msg.KIND))

        def settle(self, box):
            self.log.append((box, "settled"))

    link = Link()
    turns = DraftTurns(link)
    proposer, verifier = RemoteProposer(link, turns), RemoteVerifier(link, turns)
    proposer.start("a", [1, 2, 3], SamplingParams())
    verifier.prefill("b", [4, 5], SamplingParams(), True, True)
    verifier.submit([("a", 1, DraftTree([3], [-1]))])  # already caught up: no second Sync
    verifier.end("a")
    assert link.log == [("draft", "start"), ("draft", "settled"), ("shard", "prefill_chunk"), ("shard", "verify"),
                        ("shard", "end")]
    proposer.start("c", [1], SamplingParams())
    turns.caught_up()  # a proposal came back: the draft handled the start before it
    verifier.submit([("c", 1, DraftTree([1], [-1]))])
    assert link.log[-2:] == [("draft", "start"), ("shard", "verify")]
