"""Serving: Dovetail as a Ray Serve deployment with an OpenAI-compatible API.

    app.py      the deployment (DovetailServer), its FastAPI routes and build_app(config)
    config.py   ServeConfig: engine + serving settings, validated at the edge
    schema.py   OpenAI request bodies and error bodies
    text.py     token ids -> streamed text, stop sequences
    metrics.py  the Prometheus registry shared by all replicas
    server.py   `launch.py serve`: start Ray and Serve, run the app, shut down cleanly
"""

from dovetail.serve.config import ServeConfig


def build_app(args: dict | None = None):
    """The Serve application for a ``ServeConfig`` dict (see ``dovetail.serve.app.build_app``)."""
    from dovetail.serve.app import build_app as build

    return build(args)


__all__ = ["ServeConfig", "build_app"]
