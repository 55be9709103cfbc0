"""Liveness (the process answers) and readiness (the backend takes jobs; also refreshes the weights label)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from gateway.api.deps import RuntimeDep
from gateway.core.errors import error_response

router = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(runtime: RuntimeDep) -> JSONResponse:
    if not runtime.backend.ready():
        return error_response(503, "Triton is not ready")
    return JSONResponse({"status": "ready", "weights": runtime.weights.refresh()})
