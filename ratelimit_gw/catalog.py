"""Model resolution, the protocol guard, and the listings the model lists show (README.md,
Routes)."""

from __future__ import annotations

import difflib

from .errors import GatewayError
from .keys import KeyRecord
from .money import format_usd
from .protocols import ADAPTERS
from .protocols.model_lists import ModelListing
from .settings import Model


class Catalog:
    def __init__(self, models: dict[str, Model]) -> None:
        self._models = models
        self._sorted = sorted(models.values(), key=lambda m: m.id)
        self._listings = {m.id: _listing(m) for m in self._sorted}

    def resolve(self, model_id: str, protocol: str) -> Model:
        """The model ``model_id`` on a route of ``protocol``, which serves only its own."""
        model = self.find(model_id)
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

    def find(self, model_id: str) -> Model:
        """The model ``model_id``, of any protocol (a converter route serves them all)."""
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
        return model

    def listings(self, key: KeyRecord) -> list[ModelListing]:
        """The models ``key`` may use, sorted by id."""
        return [self._listings[m.id] for m in self._sorted if key.allows_model(m.id)]


def _listing(m: Model) -> ModelListing:
    return ModelListing(
        id=m.id,
        display_name=m.display_name,
        protocol=m.protocol,
        created=m.created,
        owned_by=m.provider.name,
        input_per_mtok=format_usd(m.input_nano_usd_per_mtok),
        output_per_mtok=format_usd(m.output_nano_usd_per_mtok),
        max_output_tokens=m.max_output_tokens,
    )
