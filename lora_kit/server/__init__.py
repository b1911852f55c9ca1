"""The HTTP server: Cloudflare Workers AI- and OpenAI-compatible APIs over the multi-adapter engine.

Modules: ``schemas`` (request bodies and ranges), ``errors`` (Cloudflare's envelope, OpenAI's
error body), ``bodies`` (size-limited JSON and multipart reading), ``auth`` (bearer token),
``sse`` (event framing), ``metrics`` (Prometheus text), ``generation`` (model names, sampling,
running requests on the engine), ``finetunes`` (Cloudflare-style uploads into the registry),
``cloudflare`` and ``openai`` (the routes), ``config`` (:class:`ServerConfig`, the server's settings
and flags), ``app`` (:func:`create_app`), ``main`` (``serve``).
"""
