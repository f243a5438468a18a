"""The web console: static files (service/console/) served at / by the BentoML service.

No build step and no third-party front-end code: the console is one HTML page, one
stylesheet and one script that call the REST API under /v1 with the key pasted into the
page (kept in the tab's sessionStorage). A strict Content-Security-Policy allows nothing
but these files and the API. It answers GET and HEAD of / and /console/<file> only;
other requests go on after one dictionary lookup, and predicts never reach it
(service/predict_path.py answers them first).
"""

from __future__ import annotations

from pathlib import Path

from starlette.responses import FileResponse
from starlette.types import ASGIApp, Receive, Scope, Send

STATIC = Path(__file__).parent / "console"
PREFIX = "/console/"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self';"
    " img-src 'self' data: blob:; media-src blob:; connect-src 'self'; form-action 'none';"
    " base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on each load, so a new version of the console is seen at once.
    "Cache-Control": "no-cache",
}


class Console:
    """ASGI middleware of the BentoML service: the console's files, everything else on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.files = {f"{PREFIX}{p.name}": p for p in STATIC.iterdir() if p.is_file()}
        self.files["/"] = STATIC / "index.html"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = self.files.get(scope["path"]) if scope["type"] == "http" else None
        if path is None or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        response = FileResponse(path, headers=SECURITY_HEADERS)
        await response(scope, receive, send)
