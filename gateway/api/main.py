"""All routes of the gateway in one router."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.api.routes import batches, health, info, jobs, metrics, page

api_router = APIRouter()
for routes in (jobs, batches, info, health, metrics, page):
    api_router.include_router(routes.router)
