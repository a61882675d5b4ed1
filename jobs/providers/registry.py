"""Provider kinds → classes, like Django's backends: add a kind by adding a module."""

from __future__ import annotations

from django.conf import settings

from jobs.models import Provider
from jobs.providers.anthropic import AnthropicProvider
from jobs.providers.base import BaseProvider, client_for
from jobs.providers.openai import OpenAIProvider


class SimulatedProvider(OpenAIProvider):
    """The built-in simulator speaks the OpenAI protocol at AIQUEUE_SIMULATOR_URL/v1."""

    @property
    def base_url(self) -> str:
        if self.provider.base_url:
            return self.provider.base_url.rstrip("/")
        return settings.AIQUEUE_SIMULATOR_URL.rstrip("/") + "/v1"


PROVIDER_CLASSES: dict[str, type[BaseProvider]] = {
    Provider.Kind.OPENAI: OpenAIProvider,
    Provider.Kind.ANTHROPIC: AnthropicProvider,
    Provider.Kind.SIMULATED: SimulatedProvider,
}


def get_provider(provider: Provider, *, read_timeout: float | None = None) -> BaseProvider:
    return PROVIDER_CLASSES[provider.kind](
        provider, client_for(provider), read_timeout=read_timeout
    )
