"""`lsaq-run serve`: an OpenAI-compatible server that holds the best variant that fits and
switches as free memory changes. One job per module:

- policy:  which variant to hold, from a memory reading, the variant held and the time (pure)
- engine:  the threads, the request queue and the loaded model's lifecycle
- metrics: the Prometheus text of the engine's state
- http:    the HTTP handlers (Starlette); openai_api: OpenAI request parsing and bodies
- server:  the socket, connection bounds, uvicorn and graceful shutdown

Importing this package imports neither Starlette nor uvicorn (only http and server do).
"""
