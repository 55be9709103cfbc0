"""The web page: one static HTML file that talks to the API from the browser."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parents[2] / "static"

router = APIRouter()


@router.get("/", response_class=FileResponse, responses={200: {"content": {"text/html": {}}}})
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")
