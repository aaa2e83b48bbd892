"""The model lists each protocol's SDK reads (README.md Routes): one listing per model, shaped
by the caller's adapter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class ModelListing:
    """What a model list says of one model (the catalog builds these from the config)."""

    id: str
    display_name: str
    protocol: str  # the protocol its upstream speaks
    created: int  # unix seconds
    owned_by: str  # the provider's name
    input_per_mtok: str  # USD, formatted
    output_per_mtok: str
    max_output_tokens: int


def openai_anthropic_list(models: Sequence[ModelListing]) -> dict[str, Any]:
    """One shape that both the OpenAI and the Anthropic SDK read (README.md, Routes)."""
    data = [
        {
            "id": m.id,
            "object": "model",
            "type": "model",
            "display_name": m.display_name,
            "type_target": m.protocol,
            "created": m.created,
            "created_at": datetime.fromtimestamp(m.created, UTC).isoformat().replace("+00:00", "Z"),
            "owned_by": m.owned_by,
            "pricing": {"input_per_mtok": m.input_per_mtok, "output_per_mtok": m.output_per_mtok},
        }
        for m in models
    ]
    return {
        "object": "list",
        "data": data,
        "total": len(data),
        "has_more": False,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def gemini_list(models: Sequence[ModelListing]) -> dict[str, Any]:
    return {"models": [gemini_model(m) for m in models]}


def gemini_model(m: ModelListing) -> dict[str, Any]:
    return {
        "name": f"models/{m.id}",
        "version": "001",
        "displayName": m.display_name,
        "description": f"{m.display_name} via ratelimit-gw ({m.protocol})",
        "outputTokenLimit": m.max_output_tokens,
        "supportedGenerationMethods": ["generateContent", "streamGenerateContent"],
    }
