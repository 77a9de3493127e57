"""OpenAI-compatible request models, validation and response shapes for the scheduler's HTTP API.

Used by ``server.app`` (the aiohttp handlers). Pure: pydantic models of ``/v1/completions`` and
``/v1/chat/completions`` bodies, conversion of validation failures into OpenAI's error shape naming
the field, prompt tokenization (byte-level tokenizer, chat framing), and builders for the JSON
responses and server-sent-event chunks.

Supported: prompt as text or token ids (one prompt per request), ``max_tokens`` (chat also
``max_completion_tokens``), ``temperature`` (0 = greedy), ``top_p``, ``seed``, ``stream`` with
``stream_options.include_usage``, ``user`` (a session id; multi-turn sessions hit the prefix index
because block hashes are content-addressed, so turn n+1 reuses turn n's persisted blocks), and the
vLLM-style extensions ``ignore_eos`` and ``stop_token_ids``. Every response choice also carries
``token_ids`` (the generated ids), which the openai client exposes as an extra field. Unsupported
features (``n`` > 1, stop strings, logprobs, echo, batches of prompts) are refused with 400.
"""

from __future__ import annotations

import codecs
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import pydantic

from dualpath_engine import config as config_mod
from dualpath_engine import tokenizer
from dualpath_engine.scheduler import protocol


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        error_type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.error_type = error_type
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class _Body(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")


class StreamOptions(_Body):
    """OpenAI ``stream_options``."""

    include_usage: bool = pydantic.Field(default=False, description="Send a last chunk with token usage.")


class _Common(_Body):
    model: str = pydantic.Field(min_length=1, description="Served model name (see /v1/models).")
    max_tokens: int | None = pydantic.Field(default=None, ge=1, description="Tokens to generate at most.")
    temperature: float = pydantic.Field(default=1.0, ge=0, le=2, description="0 = greedy.")
    top_p: float = pydantic.Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = pydantic.Field(default=None, description="Sampling seed.")
    stream: bool = pydantic.Field(default=False, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = pydantic.Field(default=None, description="Streaming options.")
    stop: str | list[str] | None = pydantic.Field(default=None, description="Unsupported unless empty.")
    n: int = pydantic.Field(default=1, ge=1, le=1, description="Only 1 choice per request.")
    user: str | None = pydantic.Field(default=None, max_length=256, description="Session / end-user id.")
    ignore_eos: bool = pydantic.Field(default=False, description="Generate exactly max_tokens.")
    stop_token_ids: list[int] | None = pydantic.Field(default=None, description="Extra stop token ids.")
    presence_penalty: float = pydantic.Field(default=0.0, description="Unsupported unless 0.")
    frequency_penalty: float = pydantic.Field(default=0.0, description="Unsupported unless 0.")

    @pydantic.field_validator("stop")
    @classmethod
    def _no_stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value:
            raise ValueError("stop strings are not supported; use stop_token_ids")
        return value

    @pydantic.field_validator("presence_penalty", "frequency_penalty", "echo", "logprobs", check_fields=False)
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        if value:
            raise ValueError("not supported by this server (leave it unset)")
        return value


class CompletionRequest(_Common):
    """Body of ``POST /v1/completions``."""

    prompt: str | list[int] | list[str] | list[list[int]] = pydantic.Field(
        description="Text or token ids (a list holding one prompt is accepted too)."
    )
    echo: bool = pydantic.Field(default=False, description="Unsupported unless false.")
    logprobs: int | None = pydantic.Field(default=None, description="Unsupported unless unset.")


class ContentPart(_Body):
    """One part of a chat message's content (text only)."""

    type: Literal["text"] = pydantic.Field(description="Only text parts are supported.")
    text: str = pydantic.Field(description="The text.")


class ChatMessage(_Body):
    """One chat message."""

    role: Literal["system", "user", "assistant", "developer"] = pydantic.Field(description="Author.")
    content: str | list[ContentPart] = pydantic.Field(description="Text, or a list of text parts.")
    name: str | None = pydantic.Field(default=None, description="Ignored author name.")

    def text(self) -> str:
        """The message's text."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Common):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = pydantic.Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = pydantic.Field(default=None, ge=1, description="Alias of max_tokens.")
    logprobs: bool = pydantic.Field(default=False, description="Unsupported unless false.")


def parse(model: type[CompletionRequest] | type[ChatRequest], raw: bytes) -> CompletionRequest | ChatRequest:
    """Validate a request body; raises ``ApiError`` (400) naming the first offending field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"body: request body is not valid JSON ({exc})", param="body") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "body: request body must be a JSON object", param="body")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise validation_error(exc) from exc


def validation_error(exc: pydantic.ValidationError) -> ApiError:
    """An ``ApiError`` (400) listing every problem as ``field: message`` with the first as ``param``."""
    problems = []
    first: str | None = None
    for error in exc.errors():
        loc = [str(part) for part in error["loc"] if not str(part).startswith(("function-", "list[", "str"))]
        field = ".".join(loc) or "body"
        first = first or field
        message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
        problems.append(f"{field}: {message}")
    return ApiError(400, "; ".join(dict.fromkeys(problems)), param=first)


def check_model(request: CompletionRequest | ChatRequest, cfg: config_mod.SchedulerConfig) -> None:
    """404 unless the request names the served model."""
    if request.model != cfg.model.name:
        raise ApiError(
            404,
            f"model: the model {request.model!r} does not exist; this server serves {cfg.model.name!r}",
            param="model",
            code="model_not_found",
        )


def prompt_ids(request: CompletionRequest | ChatRequest) -> list[int]:
    """Token ids of the prompt (chat messages framed by the tokenizer's chat markers)."""
    if isinstance(request, ChatRequest):
        role_map = {"developer": "system"}
        messages = [(role_map.get(m.role, m.role), m.text()) for m in request.messages]
        return tokenizer.encode_chat(messages)
    prompt: Any = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise ApiError(
                400, "prompt: batches of prompts are not supported; send one per request", "prompt"
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    else:
        try:
            ids = tokenizer.validate_ids(prompt)
        except tokenizer.TokenizerError as exc:
            raise ApiError(400, f"prompt: {exc}", param="prompt") from exc
    if not ids:
        raise ApiError(400, "prompt: the prompt must not be empty", param="prompt")
    return ids


def sampling_params(
    request: CompletionRequest | ChatRequest, prompt_len: int, cfg: config_mod.SchedulerConfig
) -> protocol.SamplingParams:
    """Decoding parameters; 400 when prompt + max_tokens exceed the model's context."""
    max_tokens = request.max_tokens
    param = "max_tokens"
    if isinstance(request, ChatRequest) and request.max_completion_tokens is not None:
        max_tokens, param = request.max_completion_tokens, "max_completion_tokens"
    limit = cfg.model.max_context_tokens
    if max_tokens is None:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
        max_tokens = 16 if isinstance(request, CompletionRequest) else max(limit - prompt_len, 1)
    if prompt_len + max_tokens > limit:
        raise ApiError(
            400,
            f"{param}: prompt ({prompt_len} tokens) + {param} ({max_tokens}) exceeds the model's "
            f"context of {limit} tokens",
            param=param,
        )
    stop_ids = tuple(request.stop_token_ids or ())
    try:
        tokenizer.validate_ids(stop_ids)
    except tokenizer.TokenizerError as exc:
        raise ApiError(400, f"stop_token_ids: {exc}", param="stop_token_ids") from exc
    return protocol.SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        ignore_eos=request.ignore_eos,
        stop_token_ids=stop_ids,
    )


class TextStream:
    """Turns generated token ids into text incrementally (a UTF-8 character may span tokens)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Sequence[int], final: bool = False) -> str:
        """Text completed by ``ids`` (special tokens dropped); ``final`` flushes a partial character."""
        data = bytes(token for token in ids if 0 <= token < tokenizer.BYTE_TOKENS)
        return self._decoder.decode(data, final=final)


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI usage block with the prefix-cache hit in ``prompt_tokens_details.cached_tokens``."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_body(
    chat: bool, object_id: str, model: str, text: str, ids: Sequence[int], finish: str, use: dict[str, Any]
) -> dict[str, Any]:
    """A whole (non-streaming) response."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None, "token_ids": list(ids)}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": object_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": use,
    }


def chunk_body(
    chat: bool,
    object_id: str,
    model: str,
    text: str | None,
    ids: Sequence[int],
    finish: str | None,
    first: bool = False,
) -> dict[str, Any]:
    """One streaming chunk (``text`` None: a chunk without content, e.g. the last)."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None, "token_ids": list(ids)}
    if chat:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    return {
        "id": object_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def usage_chunk(chat: bool, object_id: str, model: str, use: dict[str, Any]) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, only usage."""
    return {
        "id": object_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": use,
    }
