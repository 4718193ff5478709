"""OpenAI-compatible request bodies (pydantic, strict types) and OpenAI-style error bodies.

Every field a client may send is declared: an unknown field, a wrong type or an out-of-range
value is a 400, and options Dovetail does not implement (``n > 1``, logprobs, penalties, tools,
...) are refused by name instead of being silently ignored. Extensions: ``top_k`` and
``speculate`` (false = plain target decoding for this request).
"""

from __future__ import annotations

import json

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4  # as OpenAI
MAX_STOP_CHARS = 256  # per stop sequence: each is searched for in the text after every token
SEED_LIMIT = 2**63


class ApiError(Exception):
    """An error answered with an OpenAI-style body: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Request(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)  # extension (0 = off)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-SEED_LIMIT, lt=SEED_LIMIT)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    speculate: bool = True  # extension: false decodes with the target alone
    # accepted only at their no-op values (refused by name otherwise)
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence may be at most {MAX_STOP_CHARS} characters")
        return stops

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, why) for every option set to something Dovetail does not implement."""
        refused = []
        if self.n != 1:
            refused.append(("n", "n must be 1: Dovetail returns one choice per request"))
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                refused.append((name, f"{name} is not supported (lossless decoding samples the target as is)"))
        if self.logit_bias:
            refused.append(("logit_bias", "logit_bias is not supported"))
        if self.stream_options is not None and not self.stream:
            refused.append(("stream_options", "stream_options needs stream: true"))
        return refused


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        refused = super().unsupported()
        if self.echo:
            refused.append(("echo", "echo is not supported"))
        if self.logprobs:
            refused.append(("logprobs", "logprobs are not supported"))
        if self.best_of not in (None, 1):
            refused.append(("best_of", "best_of must be 1"))
        if self.suffix:
            refused.append(("suffix", "suffix (insertion) is not supported"))
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            refused.append(("prompt", "one prompt per request (a list of several prompts is not supported)"))
        return refused


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        refused = super().unsupported()
        if self.logprobs or self.top_logprobs:
            refused.append(("logprobs", "logprobs are not supported"))
        if self.tools or self.tool_choice not in (None, "none"):
            refused.append(("tools", "tool calling is not supported"))
        if self.response_format not in (None, {"type": "text"}):
            refused.append(("response_format", "only response_format {\"type\": \"text\"} is supported"))
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            refused.append(("max_completion_tokens", "give max_tokens or max_completion_tokens, not both"))
        return refused

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# -- responses -------------------------------------------------------------------------------------
def sse_event(payload: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def stream_chunk(rid: str, created: int, model: str, chat: bool, text: str | None = None,
                 finish_reason: str | None = None, role: bool = False) -> dict:
    """A streamed chunk: chat's ``delta`` (the first one carries the role) or a completion's ``text``."""
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice]}


def usage(prompt_tokens: int, completion_tokens: int, stats, depth: int) -> dict:
    """OpenAI's ``usage``, plus the speculative statistics of a finished request (``stats``)."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if stats is not None:
        s = stats.to_dict(depth)
        out["speculative"] = {k: s[k] for k in ("steps", "mean_accepted", "prefill_s", "draft_s", "verify_s",
                                                "total_s") if k in s}
        out["speculative"]["acceptance_by_position"] = s.get("acceptance_by_position", [])
    return out
