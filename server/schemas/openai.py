"""Pydantic models for the OpenAI-compatible API, following the official spec
(a copy is in tests/data/openapi/). Field constraints here are the API contract; limits
that an operator configures (max n, max stop strings, ...) are checked in the
routes against the settings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    field_validator,
)


def _utf8(text: str) -> str:
    """JSON may escape a lone UTF-16 surrogate (`"\\ud800"`), which no UTF-8
    text can hold: refuse it here rather than fail in the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"string is not valid UTF-8 (a lone surrogate at {exc.start})") from None
    return text


Text = Annotated[StrictStr, AfterValidator(_utf8)]
StopParam = Text | list[Text] | None
# A prompt is text or token ids, one or many (OpenAI accepts all four forms).
PromptParam = Text | list[Text] | list[StrictInt] | list[list[StrictInt]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do, so that
    # clients sending newer fields keep working.
    model_config = ConfigDict(extra="ignore")

    model: Text
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = 1.0
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = 1.0
    n: Annotated[int, Field(ge=1, le=128)] | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopParam = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: Text | None = None
    # vLLM's extension: keep generating past end-of-sequence tokens, up to
    # max_tokens or a stop string (benchmarks that need every answer as long).
    ignore_eos: bool | None = False

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, value: StopParam) -> StopParam:
        values = [value] if isinstance(value, str) else value or []
        if any(s == "" for s in values):
            raise ValueError("stop strings must not be empty")
        return value


class CompletionRequest(_Request):
    prompt: PromptParam
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None
    suffix: Text | None = None


class ChatContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Text
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ChatContentPart] | None = None
    name: Text | None = None
    tool_call_id: Text | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def missing_field(self) -> str | None:
        """The field OpenAI requires for this role that the message lacks:
        `content` for every role but an assistant turn that calls tools, and
        `tool_call_id` for a tool result."""
        if self.role == "tool" and self.tool_call_id is None:
            return "tool_call_id"
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            return "content"
        return None


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """An entry of /v1/models, with what a platform engineer needs to know
    about the variant being served beyond OpenAI's four fields."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "quantserve"
    variant: str
    architecture: str  # the transformers model class, e.g. "Gemma3ForCausalLM"
    quantization: dict[str, Any] | None
    dtype: str
    parameters: int
    weight_bytes: int
    context_length: int
    quality: dict[str, Any] | None = None
    # A LoRA adapter's card: `parent` is the base model's id (vLLM's convention),
    # `root` where the adapter was loaded from, `lora` its rank and targets.
    parent: str | None = None
    root: str | None = None
    lora: dict[str, Any] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's body: the adapter's model name and its PEFT directory on the server."""

    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^\S+$")
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=128)


class LoraAdapterResult(BaseModel):
    object: Literal["lora_adapter"] = "lora_adapter"
    id: str
    parent: str
    evicted: list[str] = []  # adapters unloaded to make room (least recently used)
