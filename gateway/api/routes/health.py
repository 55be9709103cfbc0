"""Liveness (the process answers) and readiness (the backend takes jobs; also refreshes the weights label)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from gateway.api.deps import RuntimeDep
from gateway.core.errors import ErrorBody, error_response

router = APIRouter()


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    weights: str | None = Field(description="the weight set Triton serves")


@router.get("/healthz")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz", response_model=Ready, responses={503: {"model": ErrorBody, "description": "Triton is not ready"}}
)
def readyz(runtime: RuntimeDep) -> Ready | JSONResponse:
    if not runtime.backend.ready():
        return error_response(503, "Triton is not ready")
    return Ready(status="ready", weights=runtime.weights.refresh())
