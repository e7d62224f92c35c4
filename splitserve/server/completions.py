"""What /v1/completions and /v1/chat/completions do between a validated body and the answer.

    body ─► encode prompt(s) ─► context check ─► SamplingParams per choice
         ─► conductor.generate() per choice, merged (fanout.py)
         ─► non-streaming: collect every delta, answer one JSON body
            streaming:     wait for the first delta (errors so far still get their HTTP status),
                           then SSE chunks `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`

An error after the stream has begun is sent as one `data: {"error": {...}}` event followed by
`data: [DONE]` (the openai client raises on the error event; plain SSE readers still see the end).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from splitserve.disagg.messages import Delta
from splitserve.errors import (
    InvalidRequestError,
    RequestFailed,
    ServiceUnavailable,
    SplitServeError,
)
from splitserve.router.admission import Overloaded
from splitserve.server import schemas
from splitserve.server.fanout import ClientGone, close_quietly, merge_streams, until_disconnected
from splitserve.server.metrics import ApiMetrics, SequenceTimer

log = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"
# nginx's status for "client closed request": logged by the server, received by no one.
CLIENT_CLOSED = 499


def sse(obj: dict) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


class MsgspecJSONResponse(Response):
    """JSON answers encoded by msgspec (faster than json.dumps on long logprobs)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return msgspec.json.encode(content)


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body iterator however the response ends. Starlette cancels the iteration on a
    disconnect, but if that lands while the generator sits at a `yield`, only closing it reaches
    its `finally` (and through it the conductor's abort)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await close_quietly(self.body_iterator)


def check_context(prompt_len: int, max_tokens: int, max_model_len: int, chat: bool,
                  max_tokens_param: str = "max_tokens") -> None:
    """`max_tokens_param`: the field the completion's length came from (named by the error)."""
    where = "messages" if chat else "prompt"
    if prompt_len >= max_model_len:
        raise schemas.ApiError(400, f"This model's maximum context length is {max_model_len} tokens. "
                         f"However, your {where} has {prompt_len} tokens, which leaves no room for "
                         f"the completion. Please shorten the {where}.", param=where,
                         code="context_length_exceeded")
    if prompt_len + max_tokens > max_model_len:
        raise schemas.ApiError(400, f"This model's maximum context length is {max_model_len} tokens. "
                         f"However, you requested {prompt_len + max_tokens} tokens ({prompt_len} "
                         f"in the {where}, {max_tokens} in the completion). Please reduce the "
                         f"length of the {where} or completion.", param=max_tokens_param,
                         code="context_length_exceeded")


@dataclass
class _Choice:
    index: int
    timer: SequenceTimer
    text: list[str] = field(default_factory=list)
    logprobs: list[schemas.TokenLogprob] = field(default_factory=list)
    lp_offset: int = 0  # completions' text_offset of the next token
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cached_tokens: int = 0  # its prompt's tokens found in a prefix cache


class Generation:
    """One HTTP request: its choices in flight and how their deltas become the answer."""

    def __init__(self, conductor, metrics: ApiMetrics, model: str, body, chat: bool):
        self.conductor, self.metrics, self.model = conductor, metrics, model
        self.body, self.chat = body, chat
        self.want_logprobs = body.num_logprobs is not None
        self.t_arrival = time.monotonic()
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices: list[_Choice] = []
        self.prompt_tokens = 0

    # -- start ------------------------------------------------------------------------------
    def start(self):
        """Validate against the context, then return the merged (not yet started) stream."""
        b, n = self.body, self.body.num_choices
        try:
            if self.chat:
                prompts = [self.conductor.encode_chat([m.as_dict() for m in b.messages])]
            else:
                prompts = [self.conductor.encode_prompt(p) for p in b.prompts]
        except InvalidRequestError as e:  # empty, or token ids outside the vocabulary
            raise error_for(e, self.chat, default_param="prompt") from None
        max_len = self.conductor.max_model_len
        # the field max_tokens_for took the length from (chat: max_completion_tokens wins)
        length_param = ("max_completion_tokens" if getattr(b, "max_completion_tokens", None)
                        is not None else "max_tokens")
        jobs = []
        for p, ids in enumerate(prompts):
            max_tokens = b.max_tokens_for(room=max_len - len(ids))
            check_context(len(ids), max_tokens, max_len, self.chat, length_param)
            for i in range(n):
                # seed + i: choice i of a prompt samples the same whether or not it is in a batch
                params = b.sampling_params(max_tokens=max_tokens, logprobs=b.num_logprobs,
                                           seed=None if b.seed is None else b.seed + i)
                jobs.append((f"{self.id}-{p * n + i}", ids, params, (b.ttft_slo, b.tpot_slo),
                             b.priority or 0))
            self.prompt_tokens += len(ids)
        self.choices = [_Choice(k, SequenceTimer(self.metrics, self.t_arrival))
                        for k in range(len(jobs))]
        self.metrics.prompt_tokens.inc(self.prompt_tokens)
        return merge_streams([self.conductor.generate(*job) for job in jobs])

    # -- deltas -----------------------------------------------------------------------------
    def _logprob_items(self, d: Delta) -> list[schemas.TokenLogprob]:
        entries = list(zip(d.new_token_ids, d.new_logprobs))
        if not entries:
            return []
        ids = [t for t, _ in entries] + [t for _, (_, top) in entries for t, _ in top]
        strings = iter(self.conductor.token_strings(ids))
        sampled = [next(strings) for _ in entries]
        return [schemas.TokenLogprob(s, lp, [(next(strings), tlp) for _, tlp in top])
                for s, (_, (lp, top)) in zip(sampled, entries)]

    def _apply(self, index: int, d: Delta) -> tuple[_Choice, list[schemas.TokenLogprob]]:
        c = self.choices[index]
        now = time.monotonic()
        c.timer.on_tokens(len(d.new_token_ids), now)
        items = self._logprob_items(d) if self.want_logprobs else []
        c.text.append(d.new_text)
        c.logprobs.extend(items)
        c.cached_tokens = max(c.cached_tokens, d.num_cached_tokens)
        if d.finished:
            if d.finish_reason not in ("stop", "length"):
                # "abort" is the workers' word for a request cut off without an answer.
                raise RequestFailed(f"generation ended early (finish_reason {d.finish_reason!r})")
            c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
            c.timer.on_finish(d.finish_reason, now)
        return c, items

    def _end(self, reason: str) -> None:
        """Count the choices that did not finish (client gone: abort; failure: error)."""
        now = time.monotonic()
        for c in self.choices:
            c.timer.on_finish(reason, now)

    def _usage(self) -> dict:
        # cached: the prompt's tokens a choice found in a prefix cache (its first choice's: the
        # others of a prompt share its blocks)
        cached = sum(c.cached_tokens for c in self.choices[::max(1, self.body.num_choices)])
        return schemas.usage(self.prompt_tokens, sum(c.timer.num_tokens for c in self.choices),
                             cached)

    # -- answers ----------------------------------------------------------------------------
    async def respond(self, request: Request) -> Response:
        merged = self.start()
        handed_over = False
        try:
            if self.body.stream:
                first = await until_disconnected(request, anext(merged, None))
                handed_over = True  # the stream goes on with `merged` and closes it
                return _ClosingStreamingResponse(
                    self._stream(first, merged), media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            await until_disconnected(request, self._collect(merged))
            return MsgspecJSONResponse(self._whole_answer())
        except ClientGone:
            self._end("abort")
            return Response(status_code=CLIENT_CLOSED)
        except InvalidRequestError as e:  # refused by the router (e.g. the KV pools' size)
            self._end("error")
            raise error_for(e, self.chat) from None
        except Overloaded as e:  # admission control said no: nothing ran anywhere
            self.metrics.rejected.labels(e.reason).inc()
            self._end("rejected")
            raise error_for(e, self.chat) from None
        except asyncio.CancelledError:
            self._end("abort")
            raise
        except BaseException:
            self._end("error")
            raise
        finally:
            if not handed_over:
                await close_quietly(merged)

    async def _collect(self, merged) -> None:
        async with aclosing(merged):
            async for index, delta in merged:
                self._apply(index, delta)

    def _whole_answer(self) -> dict:
        choices = []
        for c in self.choices:
            text = "".join(c.text)
            if self.chat:
                lp = schemas.chat_logprobs(c.logprobs) if self.want_logprobs else None
                choices.append(schemas.chat_choice(c.index, text, c.finish_reason, lp, c.stop_reason))
            else:
                lp = schemas.completion_logprobs(c.logprobs, 0) if self.want_logprobs else None
                choices.append(schemas.completion_choice(c.index, text, c.finish_reason, lp,
                                                   c.stop_reason))
        kind = "chat.completion" if self.chat else "text_completion"
        return schemas.envelope(kind, self.id, self.created, self.model, choices, self._usage())

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> bytes:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        if self.body.include_usage:
            return sse(schemas.envelope(kind, self.id, self.created, self.model, choices, usage))
        return sse(schemas.envelope(kind, self.id, self.created, self.model, choices))

    def _chunk_choice(self, c: _Choice, d: Delta, items: list[schemas.TokenLogprob]) -> dict | None:
        if not d.new_text and not items and not d.finished:
            return None  # e.g. a token held back mid-UTF-8: nothing to tell yet
        if self.chat:
            lp = schemas.chat_logprobs(items) if self.want_logprobs else None
            delta = {"content": d.new_text} if d.new_text else {}
            return schemas.chat_chunk_choice(c.index, delta, c.finish_reason, lp, c.stop_reason)
        lp = None
        if self.want_logprobs:
            lp = schemas.completion_logprobs(items, c.lp_offset)
            c.lp_offset += sum(len(it.token) for it in items)
        return schemas.completion_choice(c.index, d.new_text, c.finish_reason, lp, c.stop_reason)

    async def _stream(self, first, merged):
        try:
            if self.chat:  # OpenAI's first chunk of each choice names the role
                role = {"role": "assistant", "content": ""}
                for c in self.choices:
                    yield self._chunk([schemas.chat_chunk_choice(c.index, role)])
            item = first
            while item is not None:
                c, items = self._apply(*item)
                choice = self._chunk_choice(c, item[1], items)
                if choice is not None:
                    yield self._chunk([choice])
                item = await anext(merged, None)
            if self.body.include_usage:
                yield self._chunk([], self._usage())
        except SplitServeError as e:
            self._end("error")
            log.warning("request %s failed mid-stream: %s", self.id, e)
            yield sse(error_for(e, self.chat).body())
        except Exception:
            self._end("error")
            log.exception("request %s: unexpected error mid-stream", self.id)
            yield sse(schemas.error_body("internal server error", "server_error"))
        except BaseException:  # cancelled or closed: the client went away
            self._end("abort")
            raise
        finally:
            await close_quietly(merged)
        yield SSE_DONE


def error_for(e: SplitServeError, chat: bool = False,
              default_param: str | None = None) -> schemas.ApiError:
    """The HTTP answer for an error the engine side raised on purpose. A chat request's
    prompt is its `messages`."""
    if isinstance(e, InvalidRequestError):
        param = e.param or default_param
        if chat and param == "prompt":
            param = "messages"
        return schemas.ApiError(400, str(e), param=param)
    if isinstance(e, Overloaded):  # (a ServiceUnavailable: first)
        return schemas.ApiError(429, str(e), type="rate_limit_error", code=f"overloaded_{e.reason}",
                                headers={"Retry-After": str(e.retry_after_s)})
    if isinstance(e, ServiceUnavailable):
        return schemas.ApiError(503, str(e), type="service_unavailable_error")
    return schemas.ApiError(500, str(e) or type(e).__name__, type="server_error")
