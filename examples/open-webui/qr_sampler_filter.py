"""
title: qr-sampler
author: qr-sampler project
version: 0.1.0
license: Apache-2.0
description: Adds qr-sampler settings to every chat request (vllm_xargs) for vLLM.
"""

# An Open WebUI filter function. Open WebUI runs `inlet` on every chat request
# before it is sent to the model's OpenAI-compatible endpoint; this filter adds
# the qr-sampler settings of its Valves (admin) and UserValves (each user) to the
# request's `vllm_xargs`, which vLLM hands to the qr-sampler plugin as
# per-request `qr_*` options. A setting left empty (None) is not sent, so the
# vLLM server's QR_* environment decides it. User values override admin values.
#
# Self-contained on purpose: Open WebUI executes this file on its own, so it
# imports nothing from qr-sampler (only pydantic, which Open WebUI ships).

from typing import Any, Literal

from pydantic import BaseModel, Field

#: per-request keys are the qr-sampler setting names with this prefix
PREFIX = "qr_"

#: settings the filter may send, in the order they appear in the Valves form
SETTINGS = (
    "label",
    "temperature_strategy",
    "fixed_temperature",
    "edt_base_temp",
    "edt_exponent",
    "edt_min_temp",
    "edt_max_temp",
    "top_k",
    "top_p",
    "min_p",
    "sample_count",
    "log_level",
)


class SamplingValves(BaseModel):
    """qr-sampler settings; None means "use the vLLM server's setting"."""

    label: str | None = Field(
        None,
        max_length=256,
        description="Label copied into every provenance record (e.g. the experiment condition).",
    )
    temperature_strategy: Literal["fixed", "edt"] | None = Field(
        None, description="'fixed' temperature, or entropy-dependent 'edt'."
    )
    fixed_temperature: float | None = Field(
        None, ge=0.0, le=100.0, description="Temperature of the 'fixed' strategy (0 = greedy)."
    )
    edt_base_temp: float | None = Field(
        None, ge=0.0, le=100.0, description="EDT: T = base * (H / ln V) ** exponent."
    )
    edt_exponent: float | None = Field(None, ge=0.0, le=10.0, description="EDT exponent.")
    edt_min_temp: float | None = Field(None, ge=0.0, le=100.0, description="EDT lower clamp.")
    edt_max_temp: float | None = Field(None, ge=0.0, le=100.0, description="EDT upper clamp.")
    top_k: int | None = Field(
        None, ge=0, le=1_000_000, description="Keep only the k most likely tokens (0 = off)."
    )
    top_p: float | None = Field(
        None, gt=0.0, le=1.0, description="Nucleus: smallest set reaching probability p (1 = off)."
    )
    min_p: float | None = Field(
        None, ge=0.0, le=1.0, description="Drop tokens below min_p x the top probability (0 = off)."
    )
    sample_count: int | None = Field(
        None, ge=1, le=1_048_576, description="Entropy bytes per token (server default 20480)."
    )
    log_level: Literal["none", "summary", "full"] | None = Field(
        None, description="How much the sampler logs for this request (records are unaffected)."
    )


class Filter:
    class Valves(SamplingValves):
        priority: int = Field(0, description="Filter order (lower runs first).")
        enabled: bool = Field(True, description="Send qr-sampler settings at all.")
        models: str = Field(
            "",
            description="Comma-separated model ids to apply to; empty applies to every model.",
        )
        bypass: bool = Field(
            False,
            description="Hand requests to vLLM's own sampling instead of qr-sampler (qr_bypass).",
        )

    class UserValves(SamplingValves):
        pass

    def __init__(self) -> None:
        self.valves = self.Valves()

    def _applies_to(self, body: dict) -> bool:
        if not self.valves.enabled:
            return False
        wanted = [m.strip() for m in self.valves.models.split(",") if m.strip()]
        return not wanted or str(body.get("model", "")) in wanted

    def settings_for(self, user_valves: Any = None) -> dict:
        """The `qr_*` keys this filter sends, admin values overlaid by the user's."""
        chosen: dict = {}
        layers = [self.valves, _as_valves(user_valves, self.UserValves)]
        for layer in layers:
            if layer is None:
                continue
            for name in SETTINGS:
                value = getattr(layer, name, None)
                if value is None or (name == "label" and value == ""):
                    continue
                chosen[PREFIX + name] = value
        if self.valves.bypass:
            chosen[PREFIX + "bypass"] = 1
        return chosen

    def inlet(self, body: dict, __user__: dict | None = None) -> dict:
        if not self._applies_to(body):
            return body
        user_valves = (__user__ or {}).get("valves")
        settings = self.settings_for(user_valves)
        if not settings:
            return body
        existing = body.get("vllm_xargs")
        xargs = dict(existing) if isinstance(existing, dict) else {}
        xargs.update(settings)  # the filter's settings win over earlier qr_* keys
        body["vllm_xargs"] = xargs
        return body


def _as_valves(value: Any, cls: type) -> Any:
    """Open WebUI passes UserValves as a model instance; accept a dict too."""
    if value is None or isinstance(value, BaseModel):
        return value
    if isinstance(value, dict):
        return cls(**value)
    return None
