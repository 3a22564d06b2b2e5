"""The cluster page: ``GET /ui`` (the page), ``/ui/ui.css``, ``/ui/ui.js`` (its files) and
``GET /ui/data`` (the cluster view it polls, JSON; see :mod:`distribkv.ui.gather`).

With ``[auth]`` the page and its files need no token: they hold no data, and a browser cannot
send a bearer token when it opens a page. The view needs the role ``/status`` needs
(``[auth] status_role``); the page asks for a token when the view answers 401 or 403.
"""

from __future__ import annotations

import falcon

from distribkv.http.errors import ApiError
from distribkv.ui import ASSETS, asset
from distribkv.ui.gather import Gatherer

__all__ = ["AssetResource", "DataResource", "routes"]


class AssetResource:
    """One file of the page, read once from the installed package."""

    def __init__(self, name: str):
        self.content_type = ASSETS[name]
        self.body = asset(name)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = self.content_type
        # The files change only with the installed version; a reload picks up a new one.
        resp.cache_control = ["no-cache"]
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.data = self.body


class DataResource:
    def __init__(self, gatherer: Gatherer):
        self.gatherer = gatherer

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            view = self.gatherer.view()
        except TimeoutError as exc:
            raise ApiError(falcon.HTTP_503, "busy", str(exc)) from None
        resp.cache_control = ["no-store"]
        resp.media = view

    def close(self) -> None:
        self.gatherer.close()


def routes(node) -> list[tuple[str, object]]:
    return [
        ("/ui", AssetResource("index.html")),
        ("/ui/ui.css", AssetResource("ui.css")),
        ("/ui/ui.js", AssetResource("ui.js")),
        ("/ui/data", DataResource(Gatherer(node))),
    ]
