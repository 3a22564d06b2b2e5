"""The cluster page (``GET /ui``): a static page, and the cluster view it polls (``/ui/data``).

The page's files (``static/``) are package data: HTML, CSS and a script that draws its own
chart, with nothing fetched from elsewhere, so that the page works on a network with no way
out. :mod:`distribkv.ui.gather` gathers what it shows; :mod:`distribkv.http.ui` serves both.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["ASSETS", "asset"]

#: The page's files: name -> content type. Only these are served.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "ui.css": "text/css; charset=utf-8",
    "ui.js": "text/javascript; charset=utf-8",
}


def asset(name: str) -> bytes:
    """One of :data:`ASSETS`, as installed with the package."""
    if name not in ASSETS:
        raise KeyError(name)
    return resources.files(__package__).joinpath("static", name).read_bytes()
