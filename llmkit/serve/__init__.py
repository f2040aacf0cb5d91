"""The OpenAI-compatible server and the web chat.

- protocol.py   pydantic request schemas (OpenAI reference order, bounds on fields), OpenAI error shape
- app.py        `create_app(llm, ...)`: FastAPI app, thin routes, auth / body-limit / logging middlewares
- service.py    what each endpoint does: prompts, tools, constraints, SSE chunks, Responses events
- scheduler.py  continuous batching: one engine thread, rows join and leave between decode steps
- constrain.py  JSON-schema constrained decoding (a prefix validator + a per-row logits processor)
- tools.py      function calling through the chat template (<tool_call> parsing, forced-call schema)
- store.py      SQLite store of responses (previous_response_id survives restarts)
- metrics.py    Prometheus text for /metrics
- static/       index.html, the one-page chat (no build step)
"""
