"""Model resolution and the protocol guard and the model lists (README.md, Routes)."""

from __future__ import annotations

import difflib
from datetime import UTC, datetime
from typing import Any

from .accounts import KeyRecord
from .errors import GatewayError
from .money import format_usd
from .protocols import ADAPTERS
from .settings import Model


class Catalog:
    def __init__(self, models: dict[str, Model]) -> None:
        self._models = models
        self._sorted = sorted(models.values(), key=lambda m: m.id)

    def resolve(self, model_id: str, protocol: str) -> Model:
        model = self._models.get(model_id)
        if model is None:
            suggestions = difflib.get_close_matches(model_id, list(self._models), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
            raise GatewayError(
                404,
                "model_not_found",
                f"The model `{model_id}` does not exist.{hint}",
                param="model",
            )
        if model.protocol != protocol:
            converter = ADAPTERS[protocol].converter_route.format(model=model_id)
            raise GatewayError(
                400,
                "protocol_mismatch",
                f"The model `{model_id}` speaks the {model.protocol} protocol and is not served "
                f"on this {protocol} route. Use the converter route {converter} to call it in "
                f"the {protocol} format.",
                param="model",
            )
        return model

    def allowed(self, key: KeyRecord) -> list[Model]:
        return [m for m in self._sorted if key.allows_model(m.id)]

    def openai_list(self, key: KeyRecord) -> dict[str, Any]:
        """One shape that both the OpenAI and the Anthropic SDK read (README.md, Routes)."""
        data = [
            {
                "id": m.id,
                "object": "model",
                "type": "model",
                "display_name": m.display_name,
                "type_target": m.protocol,
                "created": m.created,
                "created_at": datetime.fromtimestamp(m.created, UTC)
                .isoformat()
                .replace("+00:00", "Z"),
                "owned_by": m.provider.name,
                "pricing": {
                    "input_per_mtok": format_usd(m.input_nano_usd_per_mtok),
                    "output_per_mtok": format_usd(m.output_nano_usd_per_mtok),
                },
            }
            for m in self.allowed(key)
        ]
        return {
            "object": "list",
            "data": data,
            "total": len(data),
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }

    def gemini_list(self, key: KeyRecord) -> dict[str, Any]:
        return {"models": [gemini_model(m) for m in self.allowed(key)]}


def gemini_model(m: Model) -> dict[str, Any]:
    return {
        "name": f"models/{m.id}",
        "version": "001",
        "displayName": m.display_name,
        "description": f"{m.display_name} via ratelimit-gw ({m.protocol})",
        "outputTokenLimit": m.max_output_tokens,
        "supportedGenerationMethods": ["generateContent", "streamGenerateContent"],
    }
