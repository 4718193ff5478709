"""Prometheus metrics for the whole deployment, kept in one small named actor.

Serve replicas report each finished request (one fire-and-forget call, off the token path) and
their queue depth; ``/metrics`` on any replica renders the one registry, so the numbers cover
every replica. Names follow vLLM's (``spec_decode_num_draft_tokens`` ...) with a ``dovetail:``
prefix, so existing speculative-decoding dashboards work.
"""

from __future__ import annotations

import time

import ray

METRICS_ACTOR = "dovetail-metrics"
NAMESPACE = "dovetail"
TAU_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class MetricsStore:
    """The registry (runs as a Ray actor; plain class so it can be tested in process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no `_created` twin per series

        self.registry = r = CollectorRegistry()
        p = "dovetail:"
        self.requests = Counter(p + "request_success", "Finished requests", ["finish_reason"], registry=r)
        self.errors = Counter(p + "request_errors", "Requests answered with an error", ["status"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens", registry=r)
        self.drafts = Counter(p + "spec_decode_num_drafts", "Verification steps (draft blocks)", registry=r)
        self.draft_tokens = Counter(p + "spec_decode_num_draft_tokens", "Draft tokens proposed (each step's tree "
                                    "depth)", registry=r)
        self.choices = Counter(p + "spec_decode_num_choices", "Steps by what the cost model chose: proposer(s) and "
                               "depth ('none', 0: the target alone)", ["proposer", "depth"], registry=r)
        self.predicted = Counter(p + "spec_decode_num_predicted_tokens", "Tokens the cost model expected its "
                                 "drafted steps to commit (compare with the steps' committed tokens: "
                                 "num_drafts + num_accepted_tokens)", registry=r)
        self.accepted = Counter(p + "spec_decode_num_accepted_tokens", "Accepted draft tokens", registry=r)
        self.accepted_per_pos = Counter(p + "spec_decode_num_accepted_tokens_per_pos",
                                        "Accepted draft tokens by position in the block", ["position"], registry=r)
        self.tau = Histogram(p + "spec_decode_tau", "Tokens committed per verification step, per request",
                             buckets=TAU_BUCKETS, registry=r)
        self.device_seconds = Counter(p + "device_seconds", "Busy seconds of each device by state (target: "
                                      "prefill/verify; draft: draft)", ["device", "state"], registry=r)
        self.idle_seconds = Gauge(p + "device_idle_seconds", "Seconds each device was idle: replica-seconds since "
                                  "the first replica reported, minus busy seconds", ["device"], registry=r)
        self.busy: dict[str, float] = {"target": 0.0, "draft": 0.0}
        self.replicas: set[str] = set()
        self.started: float | None = None
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.queue_time = Histogram(p + "request_queue_time_seconds", "Time waiting for the engine",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram(p + "e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.worker_restarts = Counter("dovetail_worker_restarts", "Times a replica restarted its worker group "
                                       "(a worker died or got stuck; a client's mistake never counts)", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests queued for the engine", ["replica"], registry=r)
        self.running = Gauge(p + "num_requests_running", "Requests on the engine", ["replica"], registry=r)

    def record(self, summary: dict) -> None:
        """One finished request (see ``RequestSummary`` in the app)."""
        self.requests.labels(summary["finish_reason"]).inc()
        self.prompt_tokens.inc(summary["prompt_tokens"])
        self.generation_tokens.inc(summary["completion_tokens"])
        accepted, depth = summary["accepted_per_step"], summary["depth"]
        if accepted and depth:
            self.drafts.inc(len(accepted))
            self.draft_tokens.inc(summary.get("draft_tokens", 0))
            self.accepted.inc(sum(accepted))
            for pos in range(1, depth + 1):
                self.accepted_per_pos.labels(str(pos)).inc(sum(a >= pos for a in accepted))
        if accepted:
            self.tau.observe(1 + sum(accepted) / len(accepted))
        for choice, steps in summary.get("choices", {}).items():
            proposer, _, chosen_depth = choice.partition("@")
            self.choices.labels(proposer, chosen_depth or "0").inc(steps)
        self.predicted.inc(max(0.0, summary.get("predicted_tokens", 0.0)))
        for (device, state), seconds in summary["device_seconds"].items():
            self.device_seconds.labels(device, state).inc(max(0.0, seconds))
            self.busy[device] = self.busy.get(device, 0.0) + max(0.0, seconds)
        for histogram, key in ((self.ttft, "ttft_s"), (self.queue_time, "queue_s"), (self.latency, "latency_s")):
            if summary.get(key) is not None:
                histogram.observe(summary[key])

    def record_restarts(self, count: int) -> None:
        self.worker_restarts.inc(count)

    def record_error(self, status: int) -> None:
        self.errors.labels(str(status)).inc()

    def set_load(self, replica: str, waiting: int, running: int) -> None:
        self.started = self.started or time.monotonic()
        self.replicas.add(replica)
        self.waiting.labels(replica).set(waiting)
        self.running.labels(replica).set(running)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        if self.started is not None:
            available = len(self.replicas) * (time.monotonic() - self.started)
            for device, busy in self.busy.items():
                self.idle_seconds.labels(device).set(max(0.0, available - busy))
        return generate_latest(self.registry)


def metrics_actor():
    """The deployment's metrics actor, created by the first replica that asks."""
    # threaded (prometheus_client is thread-safe): no per-caller ordering, so one lost call cannot stall the rest
    return ray.remote(MetricsStore).options(name=METRICS_ACTOR, namespace=NAMESPACE, get_if_exists=True,
                                            lifetime="detached", num_cpus=0, max_restarts=-1,
                                            max_concurrency=4).remote()


def device_seconds(stats) -> dict:
    """The device time the request used (in a batch, its share of each shared verification)."""
    return {("target", "prefill"): stats.prefill_s, ("target", "verify"): stats.verify_s,
            ("draft", "draft"): stats.draft_s}


def round4(value):
    return None if value is None else round(value, 4)
