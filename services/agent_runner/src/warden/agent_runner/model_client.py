"""Calling a model: one Chat Completions request through the official `openai` SDK, and what it cost.

The SDK retries what may pass (408, 409, 429 and 5xx answers, timeouts, lost connections) with
exponential backoff and jitter, honouring the server's `retry-after`, up to the agent's
`max_retries`; whatever is left is a `ModelError`, which fails the run on the record.
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import openai
import structlog
from pydantic import JsonValue

from warden.agent_runner.actions import ModelCall, ModelEndpoint
from warden.errors import PermanentError

log = structlog.get_logger(__name__)

# What an endpoint that needs no key is sent: the SDK refuses to build a client without one.
_NO_KEY = "no-key"


class ModelError(PermanentError):
    """The model could not answer (after the retries the SDK made); the message says what the endpoint did."""


@dataclass(frozen=True)
class ModelReply:
    """One model turn, as recorded: the assistant message, why it ended, and the tokens it took."""

    message: dict[str, JsonValue]
    finish_reason: str | None
    input_tokens: int
    output_tokens: int
    response_model: str


def _message(choice: Any) -> dict[str, JsonValue]:
    """The assistant message as the API returned it, in the API's own JSON shape (what the model is
    sent back on the next turn), without the fields that are empty."""
    message = choice.message.model_dump(mode="json", exclude_none=True)
    recorded: dict[str, JsonValue] = {"content": message.get("content")}
    if message.get("tool_calls"):
        recorded["tool_calls"] = message["tool_calls"]
    if message.get("refusal"):
        recorded["refusal"] = message["refusal"]
    return recorded


def chosen_model(call: ModelCall) -> str:
    """The model to call: the runner's `model_env` variable when set, else the agent's."""
    return (os.environ.get(call.endpoint.model_env) if call.endpoint.model_env else None) or call.model


class ModelClient:
    """One SDK client per endpoint, kept for the runner's life (its connection pool is reused)."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str, str, float, int], openai.AsyncOpenAI] = {}

    def _client(self, endpoint: ModelEndpoint) -> tuple[openai.AsyncOpenAI, str]:
        base_url = (os.environ.get(endpoint.base_url_env) if endpoint.base_url_env else None) or endpoint.base_url
        # A missing key is not refused here: local servers need none, and one that does answers 401,
        # which fails the run with the endpoint's own words.
        key = (os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None) or _NO_KEY
        cache_key = (base_url, key, endpoint.timeout_seconds, endpoint.max_retries)
        client = self._clients.get(cache_key)
        if client is None:
            client = openai.AsyncOpenAI(
                base_url=base_url, api_key=key, timeout=endpoint.timeout_seconds, max_retries=endpoint.max_retries
            )
            self._clients[cache_key] = client
        return client, base_url

    async def complete(self, call: ModelCall, tools: Sequence[Mapping[str, Any]]) -> ModelReply:
        """Ask the model for its next turn; `ModelError` when it cannot answer."""
        client, base_url = self._client(call.endpoint)
        options: dict[str, Any] = {}
        if tools:
            options["tools"] = list(tools)
        if call.max_output_tokens is not None:
            # `max_tokens`: what OpenAI-compatible servers (vLLM, Ollama, llama.cpp) all read.
            options["max_tokens"] = call.max_output_tokens
        if call.temperature is not None:
            options["temperature"] = call.temperature
        try:
            completion = await client.chat.completions.create(
                model=call.model,
                messages=call.messages,  # type: ignore[arg-type]  # the API's own JSON shape
                **options,
            )
        except openai.APIStatusError as error:
            raise ModelError(
                f"the model endpoint {base_url} answered {error.status_code}: {_error_text(error)}"
            ) from error
        except openai.APITimeoutError as error:
            raise ModelError(
                f"the model endpoint {base_url} did not answer within {call.endpoint.timeout_seconds:g}s "
                f"({call.endpoint.max_retries} retries)"
            ) from error
        except openai.APIConnectionError as error:
            raise ModelError(f"cannot reach the model endpoint {base_url}: {error}") from error
        except openai.OpenAIError as error:  # an answer the SDK could not read
            raise ModelError(f"the model endpoint {base_url} gave an unusable answer: {error}") from error
        if not completion.choices:
            raise ModelError(f"the model endpoint {base_url} answered with no choices")
        choice = completion.choices[0]
        usage = completion.usage
        return ModelReply(
            message=_message(choice),
            finish_reason=choice.finish_reason,
            input_tokens=usage.prompt_tokens if usage else 0,
            output_tokens=usage.completion_tokens if usage else 0,
            response_model=completion.model,
        )

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


def _error_text(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        detail = body.get("error", body)
        if isinstance(detail, dict) and isinstance(detail.get("message"), str):
            return str(detail["message"])[:500]
    return str(error.message)[:500]


@dataclass(frozen=True)
class ModelPrices:
    """Prices per model, in US dollars per million tokens, from the policy data (`data.warden.models`)."""

    per_million: Mapping[str, tuple[float, float]]

    @classmethod
    def from_policy_data(cls, warden: Mapping[str, Any]) -> "ModelPrices":
        """From `data.warden` (see warden.agent_runner.policy_data)."""
        models = warden.get("models", {})
        prices = {
            name: (
                float(price.get("input_usd_per_million_tokens", 0)),
                float(price.get("output_usd_per_million_tokens", 0)),
            )
            for name, price in models.items()
            if isinstance(price, dict)
        }
        return cls(prices)

    def cost_usd(self, model: str, input_tokens: int, output_tokens: int) -> float:
        """What a turn cost; 0 for a model with no price (the gate refuses those, so none is made)."""
        input_price, output_price = self.per_million.get(model, (0.0, 0.0))
        return round((input_tokens * input_price + output_tokens * output_price) / 1_000_000, 9)
