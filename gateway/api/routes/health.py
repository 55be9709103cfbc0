"""Liveness (the process answers) and readiness (the backend takes jobs; also refreshes the weights label)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from gateway.api.deps import RuntimeDep
from gateway.errors import error_response
from gateway.schemas import ErrorBody, Health, Ready

router = APIRouter()


@router.get("/healthz")
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, responses={503: {"model": ErrorBody, "description": "Triton is not ready"}})
def readyz(runtime: RuntimeDep) -> Ready | JSONResponse:
    if not runtime.backend.ready():
        return error_response(503, "Triton is not ready")
    return Ready(status="ready", weights=runtime.weights.refresh())
