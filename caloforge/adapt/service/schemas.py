"""Request and response bodies of the API (pydantic; the OpenAPI document at ``/docs`` shows them).

Requests are strict: an unknown key or a value of the wrong JSON type is a ``422`` naming the field
(``detector.yaml``, ``distillation.steps``, ...).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "DetectorIn",
    "DistillationIn",
    "ErrorBody",
    "EventOut",
    "EventsOut",
    "JobListOut",
    "JobOut",
    "RegistrationIn",
    "SubmitRequest",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DetectorIn(_Strict):
    """Exactly one of ``name`` (a built-in detector) and ``yaml`` (an inline detector YAML)."""

    name: str | None = Field(None, min_length=1, max_length=128)
    yaml: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_of(self) -> DetectorIn:
        if (self.name is None) == (self.yaml is None):
            raise ValueError("give exactly one of detector.name (built-in) and detector.yaml (inline YAML)")
        return self


class DistillationIn(_Strict):
    """Distil the adapted model: ``cd`` (consistency distillation) or ``bns`` (bespoke solvers), the
    student's default ``steps``, and dotted overrides of ``configs/distill/<method>.yaml``."""

    method: Literal["cd", "bns"]
    steps: int = Field(1, ge=1, le=64)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)


class RegistrationIn(_Strict):
    """``model_name`` (null: ``caloforge-<detector>``) and the ``alias`` the new version gets."""

    model_name: str | None = Field(None, min_length=1, max_length=256)
    alias: str = Field("candidate", min_length=1, max_length=256)


class SubmitRequest(_Strict):
    """``POST /v1/adaptations``."""

    base: str = Field(
        ..., min_length=1, max_length=1024, description="models:/NAME@ALIAS, NAME@ALIAS, models:/NAME/VERSION"
    )
    detector: DetectorIn
    data: str = Field(..., min_length=1, max_length=4096, description="a shard directory inside a data root")
    strategy: Literal["full", "lora", "bias", "embedding"] = "full"
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="dotted overrides of configs/adapt/<strategy>.yaml"
    )
    distillation: DistillationIn | None = None
    registration: RegistrationIn = Field(default_factory=RegistrationIn)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    metadata: dict[str, Any] = Field(default_factory=dict)


class JobOut(BaseModel):
    id: str
    status: str
    stage: str | None
    spec: dict[str, Any]
    creator: str
    idempotency_key: str | None
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    error: str | None
    result: dict[str, Any] | None
    attempts: int
    cancel_requested: bool


class JobListOut(BaseModel):
    data: list[JobOut]
    next_cursor: str | None


class EventOut(BaseModel):
    seq: int
    time: str
    kind: str
    stage: str | None
    message: str
    data: dict[str, Any] | None


class EventsOut(BaseModel):
    data: list[EventOut]
    last_seq: int


class _ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: _ErrorDetail
