"""OpenAI request bodies (validated where they enter) and the JSON shapes of the answers.

Where OpenAI, vLLM and this server differ, and why:
- prompt: a string, a list of token ids, or a batch (a list of either). A batch of P prompts with n
  choices each answers P*n choices, choice index = prompt_index * n + i (OpenAI's order).
- stop: at most MAX_STOP strings. OpenAI allows 4 and vLLM any number; evaluation harnesses send
  more than 4, and every stop string is matched against each new token's text, hence a bound.
  An empty list is no stop strings; an empty string is refused.
- A batch of prompts times n is at most MAX_CHOICES choices: each is a request in flight.
- seed is a 64-bit signed integer (as vLLM; negative seeds are fine), top_k and stop_token_ids
  at most 2**63 - 1: larger integers cannot cross the workers' sockets.
- Text must be valid Unicode: a lone surrogate (JSON "\\ud800") is refused where it entered,
  since no tokenizer or UTF-8 encoder can take it.
- Features this server does not have (echo, suffix, logit_bias, best_of != n, non-zero penalties,
  tools, non-text content parts, a response_format other than text) are refused with a 400 naming
  the field rather than ignored: ignoring them would answer something the client did not ask for.
  Fields nobody here knows about are ignored, as vLLM does.
- Types are strict: "10" and true are not integers, 1 is not a boolean, "0.5" is not a number.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from splitserve.request import MAX_LOGPROBS, SamplingParams

StrictInt = Annotated[int, Strict()]
StrictFloat = Annotated[float, Strict()]  # an integer is still a number
StrictBool = Annotated[bool, Strict()]


def valid_unicode(v: str) -> str:
    """v, unless it holds a lone surrogate (JSON allows "\\ud800"; UTF-8 and tokenizers do not)."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"must be valid Unicode text: character {e.start} is a lone surrogate "
                         f"({v[e.start]!r})") from None
    return v


StrictStr = Annotated[str, Strict(), AfterValidator(valid_unicode)]
# in a union, whose validator checks the text itself (a union's error would name its members)
UncheckedStr = Annotated[str, Strict()]

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
MAX_N = 128  # OpenAI's bound on n
MAX_CHOICES = 2048  # prompts x n in one request
MAX_STOP = 16
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# JSON has no -inf; a token the model rules out entirely is reported with this logprob (as vLLM).
LOWEST_LOGPROB = -9999.0


# -- errors -----------------------------------------------------------------------------------
def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.type, self.param, self.code = type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


# -- requests ---------------------------------------------------------------------------------
def _refused(*fields: str, why: str):
    """A validator refusing a feature this server does not have: any truthy value of `fields`
    is a 400 saying `why` (unset, 0, false or empty pass)."""

    def check(cls, v):
        if v:
            raise ValueError(why)
        return v

    return field_validator(*fields)(classmethod(check))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool | None = False


class _GenerationRequest(BaseModel):
    """Fields both endpoints share. None everywhere means "the default"."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=-1, le=I64_MAX)  # extension: 0 or -1 = off
    n: StrictInt | None = Field(1, ge=1, le=MAX_N)
    stop: UncheckedStr | list[UncheckedStr] | None = None
    seed: StrictInt | None = Field(None, ge=I64_MIN, le=I64_MAX)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logit_bias: dict[str, Any] | None = None
    user: StrictStr | None = None  # accepted and ignored
    # vLLM extensions
    ignore_eos: StrictBool | None = False
    stop_token_ids: list[Annotated[int, Strict(), Field(ge=0, le=I64_MAX)]] | None = None
    include_stop_str_in_output: StrictBool | None = False
    # splitserve extensions: this request's SLOs in seconds (admission control judges it by
    # them instead of serve's --ttft-slo / --tpot-slo)
    ttft_slo: StrictFloat | None = Field(None, gt=0, le=86400)
    tpot_slo: StrictFloat | None = Field(None, gt=0, le=3600)
    # vLLM's: lower is more important; admission refuses priority > 0 first (default 0)
    priority: StrictInt | None = Field(None, ge=-(2**31), le=2**31 - 1)

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop(cls, v, handler):
        try:
            v = handler(v)
        except ValidationError:
            raise ValueError("must be a string or a list of strings") from None
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are supported, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        for s in stops:
            valid_unicode(s)
        return v

    _no_penalty = _refused("presence_penalty", "frequency_penalty",
                           why="penalties are not supported by this server; leave it unset or 0")

    _no_logit_bias = _refused("logit_bias", why="logit_bias is not supported by this server")

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, v, info: ValidationInfo):
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options can only be given together with stream=true")
        return v

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, *, max_tokens: int, logprobs: int | None,
                        seed: int | None) -> SamplingParams:
        """SamplingParams validates again and raises InvalidRequestError naming the field."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or 0,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=seed,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
        )


class CompletionRequest(_GenerationRequest):
    # text checked below (valid_unicode), so that one message names the prompt at fault
    prompt: str | list[StrictInt] | list[Annotated[str, Strict()]] | list[list[StrictInt]]
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool | None = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, v, handler, info: ValidationInfo):
        # One message instead of one per member of the union.
        try:
            v = handler(v)
        except ValidationError:
            raise ValueError("must be a string, a list of token ids, or a list of strings or of "
                             "token-id lists (a batch)") from None
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        batch = v if isinstance(v, list) and not isinstance(v[0], int) else [v]
        for i, p in enumerate(batch):
            where = f"prompt {i} of the batch " if len(batch) > 1 else ""
            if isinstance(p, str):
                try:
                    valid_unicode(p)
                except ValueError as e:
                    raise ValueError(f"{where}{e}") from None
            elif not p:
                raise ValueError(f"{where}must not be an empty list of token ids")
        n = info.data.get("n") or 1
        if len(batch) * n > MAX_CHOICES:
            raise ValueError(f"{len(batch)} prompts x n={n} is more than {MAX_CHOICES} choices "
                             "in one request; send fewer prompts at once")
        return v

    _no_echo = _refused("echo", why="echo=true is not supported by this server")

    _no_suffix = _refused("suffix", why="suffix is not supported by this server")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info: ValidationInfo):
        if v not in (None, info.data.get("n") or 1):
            raise ValueError("best_of is not supported by this server (only best_of = n)")
        return v

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch: each item is one prompt, as text or as token ids."""
        p = self.prompt
        if isinstance(p, str) or isinstance(p[0], int):
            return [p]
        return list(p)

    def max_tokens_for(self, room: int) -> int:
        """Not `room` (what the prompt leaves of the context): OpenAI's default is 16."""
        return 16 if self.max_tokens is None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    """content is normalized to a str: text parts are joined with newlines (as vLLM)."""

    model_config = ConfigDict(extra="ignore")
    role: StrictStr
    content: UncheckedStr | list[dict[str, Any]] | None = None
    name: StrictStr | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, v):
        if v not in CHAT_ROLES:
            raise ValueError(f"must be one of {', '.join(CHAT_ROLES)}, got {v!r}")
        return v

    @field_validator("content", mode="wrap")
    @classmethod
    def _text_only(cls, v, handler):
        try:
            v = handler(v)
        except ValidationError:
            raise ValueError("must be a string or a list of content parts") from None
        if v is None or isinstance(v, str):
            return valid_unicode(v or "")
        texts = []
        for part in v:
            if part.get("type") != "text":
                raise ValueError("only text content parts are supported, got type "
                                 f"{part.get('type')!r}")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs a string 'text'")
            texts.append(valid_unicode(part["text"]))
        return "\n".join(texts)

    def as_dict(self) -> dict:
        d = {"role": self.role, "content": self.content}
        if self.name is not None:
            d["name"] = self.name
        return d


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    _no_tools = _refused("tools", why="tool calling is not supported by this server")

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, v):
        if v and v.get("type") != "text":
            raise ValueError("only the 'text' response format is supported by this server")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, v, info: ValidationInfo):
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs=true")
        return v

    def max_tokens_for(self, room: int) -> int:
        """`room`: what the prompt leaves of the context, the default (as vLLM).
        max_completion_tokens replaced max_tokens in OpenAI's chat API and wins over it."""
        for v in (self.max_completion_tokens, self.max_tokens):
            if v is not None:
                return v
        return room

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# -- answers ----------------------------------------------------------------------------------
class TokenLogprob(NamedTuple):
    token: str
    logprob: float
    top: list[tuple[str, float]]  # the k most likely tokens, best first


def _lp(x: float) -> float:
    return x if x >= LOWEST_LOGPROB else LOWEST_LOGPROB  # also maps NaN


def completion_logprobs(items: list[TokenLogprob], text_offset: int) -> dict:
    """`text_offset`: where the first item's token starts in the choice's text. Offsets advance by
    each token's text length, as in vLLM (a token held back mid-UTF-8 shifts them)."""
    offsets = []
    for it in items:
        offsets.append(text_offset)
        text_offset += len(it.token)
    return {
        "tokens": [it.token for it in items],
        "token_logprobs": [_lp(it.logprob) for it in items],
        "top_logprobs": [{t: _lp(lp) for t, lp in it.top} for it in items],
        "text_offset": offsets,
    }


def chat_logprobs(items: list[TokenLogprob]) -> dict:
    def entry(token: str, lp: float) -> dict:
        return {"token": token, "logprob": _lp(lp), "bytes": list(token.encode("utf-8"))}

    return {"content": [entry(it.token, it.logprob)
                        | {"top_logprobs": [entry(t, lp) for t, lp in it.top]} for it in items]}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage, with prompt_tokens_details.cached_tokens (prefix-cache hits)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict | None = None, stop_reason: int | str | None = None) -> dict:
    """One choice of a text_completion, whole or (streaming) the text added since the last chunk."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def chat_choice(index: int, content: str, finish_reason: str | None, logprobs: dict | None = None,
                stop_reason: int | str | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": content},
            "logprobs": logprobs, "finish_reason": finish_reason, "stop_reason": stop_reason}


def chat_chunk_choice(index: int, delta: dict, finish_reason: str | None = None,
                      logprobs: dict | None = None, stop_reason: int | str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


_ABSENT: Any = object()


def envelope(object: Literal["text_completion", "chat.completion", "chat.completion.chunk"],
             id: str, created: int, model: str, choices: list[dict],
             usage: dict | None = _ABSENT) -> dict:
    """A whole answer or one streamed chunk. `usage` left out: no usage key at all (a stream
    without include_usage); None: "usage": null (the other chunks of one with it)."""
    body = {"id": id, "object": object, "created": created, "model": model, "choices": choices}
    if usage is not _ABSENT:
        body["usage"] = usage
    return body
