"""`infercept-serve`: an OpenAI-compatible server that keeps paused contexts across tool round trips.

`service.Service` puts one `InterceptEngine` behind the routes of `app.build_app`; `sessions`
holds each conversation's request paused between its turns; `turns` turns engine events into
what the client sees; `params` checks request bodies; `metrics` answers `/metrics`.
"""
from .app import build_app
from .background import BackgroundServer
from .service import ServeConfig, Service

__all__ = ["BackgroundServer", "ServeConfig", "Service", "build_app"]
