"""The Ray Serve deployment: an OpenAI-compatible HTTP API in front of one Dovetail engine.

    from dovetail.serve import build_app
    serve.run(build_app({"target": "qwen2.5-coder-1.5b-instruct", "replicas": 2}))

Each replica owns a complete actor engine (coordinator, draft, target shards) on its own share of
the machine's sockets. Up to ``max_batch`` requests decode together on it (their trees verified
in one target forward); the others wait in arrival order for a slot.
Tokens stream as they are committed, one server-sent event per step (the tokens it committed); a
client that goes away cancels its request, which frees its KV caches after the current step.
"""


import asyncio
import copy
import hmac
import json
import logging
import os
import re
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
import ray
from ray import serve

from dovetail import batching
from dovetail.errors import EngineError, UserError
from dovetail.request import RequestError, check_request
from dovetail.models.loading import encode_messages
from dovetail.sampling import SamplingParams
from dovetail.serve import edge, schema, side_calls, slots
from dovetail.serve.metrics import device_seconds, round4
from dovetail.serve.config import ServeConfig
from dovetail.serve.schema import ApiError, ChatCompletionRequest, CompletionRequest
from dovetail.text import TextAssembler

log = logging.getLogger("dovetail.serve")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # as OpenAI's completions endpoint
CHAT_DEFAULT_MAX_TOKENS = 2048  # a long answer; within the context left, and always within the KV admission
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

app = FastAPI(title="Dovetail", description="OpenAI-compatible API over lossless speculative decoding")


# -- errors: always an OpenAI-style body, never a bare 500 for a client's mistake ----------------
RETRY_AFTER_S = 1  # what a 429 tells a client to wait
HEALTH_TIMEOUT_S = 5.0  # /health answers 503 when the engine cannot say it is ready within this


edge.install_handlers(app, log, RETRY_AFTER_S)


# (helpers sit above the class: Serve pickles the class when it is decorated)
def _configure_logging() -> None:
    """Request logs are one JSON object per line on the replica's stderr."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class DovetailServer:
    def __init__(self, config: dict):
        from dovetail.api import Dovetail

        edge.replica_grpc_on_loopback()
        self.config = ServeConfig.parse(config)
        self.replica = edge.replica_name()
        self.part = slots.claim_part(self.config.node_slots())  # this replica's share of its node
        self.dovetail = Dovetail(self.config.engine, partition=self.part).load()
        self.engine, self.tokenizer = self.dovetail.engine, self.dovetail.tokenizer
        if self.engine.plan.control_cpus:  # it wakes every step: off the target's cores when the plan keeps one
            os.sched_setaffinity(0, self.engine.plan.control_cpus)
        self.eos = set(self.dovetail.eos_token_ids)
        self.depth = self.engine.depth
        self.model_name = self.config.model_name
        self.started_at = int(time.time())
        # requests on the engine at once: its batch, and the worst-case KV caches that fit its budget
        self.admission = edge.FifoAdmission(self.engine.max_batch, self.engine.kv_budget_bytes)
        self.encoder = copy.deepcopy(self.tokenizer)  # prompts are encoded off the event loop, with this one
        self.tokenizing = asyncio.Lock()  # one encode at a time (HF fast tokenizers are not reentrant)
        self.waiting = self.running = 0
        self.metrics = side_calls.metrics()
        self.generation = self.engine.info.get("generation", 1)  # of the worker group: counts its restarts
        _configure_logging()
        log.info(json.dumps({"event": "replica_ready", "replica": self.replica, "model": self.model_name,
                             "part": f"{self.part[0] + 1}/{self.part[1]}", "node": self.engine.node_id,
                             "plan": self.engine.plan.describe(), "max_batch": self.engine.max_batch}))

    def __del__(self):
        dovetail = getattr(self, "dovetail", None)
        if dovetail is not None:
            dovetail.close()
        if getattr(self, "part", None) is not None:
            slots.release_part()

    # -- endpoints -----------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        """With an API key configured, ``/v1/*`` needs ``Authorization: Bearer <key>`` (a 401 otherwise)."""
        key = self.config.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", kind="authentication_error")

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.started_at,
                                            "owned_by": "dovetail", "max_model_len": self.dovetail.context_length}]}

    @app.get("/health")
    async def health(self, request: Request, workers: bool = False):
        """Liveness and this replica's queue; ``?workers=true`` also asks every worker how many
        requests it holds state (a KV cache) for."""
        edge.local_only(request)
        try:
            ready = await asyncio.wait_for(self.engine.coordinator.healthy.remote(), HEALTH_TIMEOUT_S)
        except Exception:  # no answer in time: the coordinator is wedged or gone
            ready = False
        if not ready:
            return JSONResponse({"status": "unavailable", "waiting": self.waiting, "running": self.running},
                                status_code=503)
        out = {"status": "ok", "waiting": self.waiting, "running": self.running, "replica": self.replica,
               "node": self.engine.node_id, "part": f"{self.part[0] + 1}/{self.part[1]}",
               "max_batch": self.engine.max_batch, "max_batch_why": self.engine.info.get("max_batch_why")}
        if workers:
            info = await self.engine.coordinator.info.remote(refresh=True)
            out["worker_requests"] = {name: w.get("live_requests") for name, w in info["workers"].items()}
        return out

    @app.get("/metrics")
    async def metrics(self, request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST

        edge.local_only(request)
        await side_calls.settle_metrics()  # read-your-writes for this replica; other replicas' records are eventual
        return Response(await self.metrics.render.remote(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        body = await edge.parse(request, CompletionRequest, self.config.max_body_bytes)
        return await self._respond(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        body = await edge.parse(request, ChatCompletionRequest, self.config.max_body_bytes)
        return await self._respond(request, body, chat=True)

    # -- one request -----------------------------------------------------------------------------
    async def _respond(self, request: Request, body, chat: bool):
        job = await self._job(request, body, chat)
        if self.waiting >= self.config.max_queued_requests:
            raise ApiError(429, f"{self.waiting} requests are already queued on this replica; retry later",
                           code="queue_full", kind="rate_limit_error")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(job, chat, include_usage), media_type="text/event-stream")
        async for _ in self._run(job):
            pass
        choice = ({"index": 0, "message": {"role": "assistant", "content": job.text}} if chat
                  else {"index": 0, "text": job.text})
        choice.update(logprobs=None, finish_reason=job.finish_reason)
        return JSONResponse({"id": job.rid, "object": "chat.completion" if chat else "text_completion",
                             "created": job.created, "model": self.model_name, "choices": [choice],
                             "usage": self._usage(job)})

    async def _job(self, request: Request, body, chat: bool) -> edge.Job:
        """Check the request against this model and turn it into a ``Job`` (400s here)."""
        if body.model not in (None, self.model_name):
            raise ApiError(400, f"model {body.model!r} is not served here; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        refused = body.unsupported()
        if refused:
            param, why = refused[0]
            raise ApiError(400, why, param=param, code="unsupported_parameter")
        prompt_ids = await self._encode(body, chat)
        context = self.dovetail.context_length
        try:
            check_request(prompt_ids, None, context)  # the same check as the CLI's and the API's
        except RequestError as exc:
            raise ApiError(400, str(exc), param="messages" if chat and exc.param == "prompt" else exc.param,
                           code=exc.code) from None
        budget = body.token_budget if chat else body.max_tokens
        room = context - len(prompt_ids)
        if budget is not None and budget > room:
            raise ApiError(400, f"max_tokens {budget} + the prompt's {len(prompt_ids)} tokens exceed this model's "
                           f"context of {context}", param="max_tokens", code="context_length_exceeded")
        if budget is None:  # the default, within the context and the KV budget
            default = CHAT_DEFAULT_MAX_TOKENS if chat else COMPLETION_DEFAULT_MAX_TOKENS
            budget = max(1, min(default, room, self.engine.kv_room(len(prompt_ids))))
        max_tokens = budget
        try:
            self.engine.check_kv(len(prompt_ids), max_tokens)
        except UserError as exc:  # it could never fit, even alone: waiting would not help
            raise ApiError(400, str(exc), param="max_tokens", code="kv_budget_exceeded") from None
        vocab = self.dovetail.target_config.vocab_size
        if body.top_k > vocab:
            raise ApiError(400, f"top_k must be at most the vocabulary size ({vocab}), got {body.top_k}",
                           param="top_k")
        try:
            params = SamplingParams(body.temperature, body.top_p, body.top_k, body.seed)
        except UserError as exc:
            raise ApiError(400, str(exc)) from None
        # The engine's key is always ours. A client's X-Request-Id (else the one Serve's proxy made)
        # is only logged; the proxy echoes it in the response. Two requests with the same header
        # must not share KV state, nor a retry inherit a cancellation.
        header = request.headers.get("x-request-id", "")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        return edge.Job(rid, prompt_ids, max_tokens, params, body.speculate, body.stop or [],
                   self.engine.kv_bytes(len(prompt_ids), max_tokens),
                   client_id=header if REQUEST_ID.fullmatch(header) else None, tenant=body.user or "")

    async def _encode(self, body, chat: bool) -> list[int]:
        """The prompt's ids, made in a thread so that a long prompt or template never stalls the
        event loop that streams other requests' tokens; with a tokenizer of its own, since the
        loop's detokenizers use theirs meanwhile."""
        async with self.tokenizing:
            return await asyncio.to_thread(self._chat_ids if chat else self._prompt_ids, body)

    def _prompt_ids(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "the prompt is empty", param="prompt")
            return self.encoder.encode(prompt)
        vocab = min(len(self.encoder), self.dovetail.target_config.vocab_size)
        if not prompt or any(not 0 <= t < vocab for t in prompt):
            raise ApiError(400, f"a token-id prompt needs ids in [0, {vocab})", param="prompt")
        return list(prompt)

    def _chat_ids(self, body: ChatCompletionRequest) -> list[int]:
        if not self.encoder.chat_template:
            raise ApiError(400, f"model {self.model_name!r} has no chat template; use /v1/completions",
                           code="no_chat_template")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            return encode_messages(self.encoder, messages)
        except UserError as exc:  # the template's own checks (e.g. role order) are the client's to fix
            raise ApiError(400, str(exc), param="messages") from None

    # -- decoding --------------------------------------------------------------------------------
    async def _run(self, job: edge.Job):
        """Wait for the engine (FIFO), then yield the text of each committed token as it comes."""
        self._load(waiting=+1)
        queued, outcome = True, "cancelled"
        try:
            async with self.admission.take(job.kv_bytes):
                queued = False
                self._load(waiting=-1, running=+1)
                try:
                    job.started = time.perf_counter()
                    async for text in self._decode(job):
                        yield text
                    outcome = job.finish_reason
                except EngineError as exc:
                    outcome = "error"
                    raise ApiError(500, str(exc), code="engine_error") from None
                finally:
                    self._load(running=-1)
        finally:
            if queued:
                self._load(waiting=-1)
            self._finish(job, outcome)

    async def _decode(self, job: edge.Job):
        from dovetail.request import Request, Tokens, final_stats

        assembler = TextAssembler(self.tokenizer, job.stop)
        stream = self.engine.submit(Request(job.prompt_ids, job.max_tokens, job.params, job.speculate,
                                            request_id=job.rid, tenant=job.tenant))
        finished = False
        try:
            async for item in stream:
                if not isinstance(item, Tokens):
                    self._note_generation(item.generation)
                    job.stats, finished = final_stats(item), True
                    break
                if assembler.stopped:
                    continue  # tokens of the step that hit a stop sequence: drained, not shown
                job.first_token = job.first_token or time.perf_counter()
                text = ""  # a step's tokens go out as one event: one wake-up per step for every process
                for token in item.ids:
                    job.tokens.append(token)
                    text += assembler.add(token)
                    if assembler.stopped:
                        side_calls.side_call(self.engine.cancel, job.rid)  # ends after this step; drain to its stats
                        break
                if text:
                    job.text += text
                    yield text
        finally:
            if not finished:  # the client went away (or a stop sequence and then an error)
                side_calls.side_call(self.engine.cancel, job.rid)
        tail = assembler.flush()
        if tail:
            job.text += tail
            yield tail
        ended_on_eos = bool(job.tokens) and job.tokens[-1] in self.eos
        job.finish_reason = "stop" if assembler.stopped or ended_on_eos else "length"

    def _note_generation(self, generation: int | None) -> None:
        """Count worker-group restarts (``dovetail_worker_restarts_total``) from requests' last items."""
        if generation is not None and generation > self.generation:
            side_calls.record(self.metrics.record_restarts.remote, generation - self.generation)
            self.generation = generation

    async def _sse(self, job: edge.Job, chat: bool, include_usage: bool):
        event = schema.sse_event

        def chunk(text: str | None, finish_reason: str | None = None, role: bool = False) -> str:
            return event(schema.stream_chunk(job.rid, job.created, self.model_name, chat, text, finish_reason, role))

        try:
            if chat:
                yield chunk(None, role=True)
            async for text in self._run(job):
                yield chunk(text)
            yield chunk(None, job.finish_reason)
            if include_usage:
                yield event({**schema.stream_chunk(job.rid, job.created, self.model_name, chat), "choices": [],
                             "usage": self._usage(job)})
        except ApiError as exc:
            side_calls.count_error(exc.status)
            yield event(exc.body())
        except Exception as exc:  # a bug: still end the stream with an error the client can read
            log.exception("request %s failed", job.rid)
            side_calls.count_error(500)
            yield event(ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error").body())
        yield "data: [DONE]\n\n"

    # -- bookkeeping ------------------------------------------------------------------------------
    def _usage(self, job: edge.Job) -> dict:
        return schema.usage(len(job.prompt_ids), len(job.tokens), job.stats, self.depth if job.speculate else 0)

    def _load(self, waiting: int = 0, running: int = 0) -> None:
        self.waiting += waiting
        self.running += running
        side_calls.record(self.metrics.set_load.remote, self.replica, self.waiting, self.running)

    def _finish(self, job: edge.Job, outcome: str) -> None:
        """One metrics record and one structured log line per request, however it ended."""
        now = time.perf_counter()
        stats = job.stats
        depth = self.depth if job.speculate else 0
        summary = {
            "finish_reason": outcome, "prompt_tokens": len(job.prompt_ids), "completion_tokens": len(job.tokens),
            "accepted_per_step": list(stats.accepted_per_step) if stats else [], "depth": depth,
            "draft_tokens": stats.draft_tokens if stats and job.speculate else 0,
            "choices": dict(stats.choices) if stats and job.speculate else {},
            "predicted_tokens": stats.predicted_tokens if stats and job.speculate else 0.0,
            "ttft_s": job.first_token - job.arrival if job.first_token else None,
            "queue_s": job.started - job.arrival if job.started else None, "latency_s": now - job.arrival,
            "device_seconds": device_seconds(stats) if stats else {},
        }
        side_calls.record(self.metrics.record.remote, summary)
        log.info(json.dumps({"event": "request_done", "request_id": job.rid, "client_request_id": job.client_id,
                             "replica": self.replica,
                             "outcome": outcome, "prompt_tokens": summary["prompt_tokens"],
                             "completion_tokens": summary["completion_tokens"],
                             "tau": round(stats.mean_accepted, 3) if stats else None,
                             "queue_s": round4(summary["queue_s"]), "ttft_s": round4(summary["ttft_s"]),
                             "latency_s": round4(summary["latency_s"])}))


def build_app(args: dict | None = None):
    """The Serve application for ``args`` (a ``ServeConfig`` dict; YAML ``args`` land here)."""
    config = ServeConfig.parse(dict(args or {}))
    if config.replicas_per_node is None and ray.is_initialized():  # spread over the cluster's nodes
        config = config.model_copy(update={"replicas_per_node": config.node_slots(len(slots.cluster_nodes()))})
    # Serve must let every request the replica may hold through (the batch on the engine plus the
    # queue, plus one to refuse): with fewer, Serve queues the excess itself and the 429 never fires.
    # (An "auto" batch is resolved in the replica; here it counts as the largest it can be.)
    # A replica reserves its share of a node's CPUs, which its engine's actors (num_cpus=0) pin.
    options = dict(max_ongoing_requests=config.max_queued_requests + batching.bound(config.engine.max_batch) + 1,
                   ray_actor_options={"num_cpus": slots.replica_cpus(config.node_slots()),
                                      "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}}})
    if config.autoscaling:
        options["autoscaling_config"] = config.autoscaling.model_dump()
    else:
        options["num_replicas"] = config.replicas
    return DovetailServer.options(**options).bind(config.to_args())
