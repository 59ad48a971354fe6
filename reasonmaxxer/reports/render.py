"""The Jinja environment of the HTML reports: templates/*.html.j2 (autoescaped), templates/*.css
(included verbatim), loaded from the installed package (works for editable and regular installs;
pyproject.toml ships reports/templates/* as package data)."""

from __future__ import annotations

import base64
import json
from functools import cache
from typing import Any

import jinja2
from markupsafe import Markup


def script_json(obj: Any) -> Markup:
    """JSON safe inside <script>: '<', '>' and '&' as \\u escapes (cannot close the element)."""
    return Markup(
        json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("reasonmaxxer", "reports/templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=True),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["script_json"] = script_json
    env.filters["data_uri"] = png_data_uri
    return env


def render(template: str, **context: Any) -> str:
    """Render templates/`template` with `context`."""
    return environment().get_template(template).render(**context)
