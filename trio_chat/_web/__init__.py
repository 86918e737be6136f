"""The HTTP side of an instance: the admin listener.

``admin`` is the Starlette application (the ``/v1`` admin API, health, readiness and metrics,
served by Hypercorn's trio worker); ``pages`` serves the browser side (the demo page, the
dashboard and ``client.js`` from ``static/``); ``openapi.json`` describes the API and is served
at ``GET /openapi.json``.
"""
