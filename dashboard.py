"""GET /dashboard (the operator's page) and GET /docs (Swagger UI of /openapi.json), served locally.

The dashboard is plain HTML + one small script in dashboard_assets/ (no build step, no CDN): it polls
the JSON routes (/overview, /jobs, /jobs/<id>, /pipelines) with the API key the operator typed in, and
cancels through /cancel/<id> and /pipelines/<id>/cancel. The page and its script hold no data, so they
open without a key; the data needs one. Swagger UI's files come from the swagger-ui-py package (Swagger
UI 5, which reads OpenAPI 3.1).
"""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

from flask import Blueprint, Response, send_from_directory
from werkzeug.exceptions import NotFound

dashboard_routes = Blueprint("dashboard", __name__)

SHELL_ROUTES = ("/dashboard",)
ASSET_PREFIX = "/dashboard/assets/"
ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
SWAGGER_FILES = ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js",
                 "favicon-32x32.png", "favicon-16x16.png")

DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>c3-render API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/assets/swagger-ui-standalone-preset.js"></script>
<script src="/dashboard/assets/docs.js"></script>
</body></html>
"""


def asset(name: str) -> str:
    return (resources.files("dashboard_assets") / name).read_text(encoding="utf-8")


def swagger_dir() -> Path:
    """Where swagger-ui-py keeps Swagger UI's files (found without importing its framework glue)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise NotFound()
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def page(text: str, content_type: str) -> Response:
    response = Response(text, content_type=f"{content_type}; charset=utf-8")
    response.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; "
                                                   "style-src 'self' 'unsafe-inline'")
    return response


@dashboard_routes.get("/dashboard")
def dashboard() -> Response:
    return page(asset("index.html"), "text/html")


@dashboard_routes.get("/dashboard/assets/<name>")
def dashboard_asset(name: str) -> Response:
    suffix = Path(name).suffix
    if name not in ("dashboard.js", "dashboard.css", "docs.js") or suffix not in ASSET_TYPES:
        raise NotFound()
    return page(asset(name), ASSET_TYPES[suffix])


@dashboard_routes.get("/docs")
def docs() -> Response:
    return page(DOCS_PAGE, "text/html")


@dashboard_routes.get("/docs/assets/<name>")
def docs_asset(name: str) -> Response:
    if name not in SWAGGER_FILES:
        raise NotFound()
    return send_from_directory(swagger_dir(), name, max_age=3600)
