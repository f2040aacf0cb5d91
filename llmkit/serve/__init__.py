"""The OpenAI-compatible server and the web chat.

- protocol.py   pydantic request schemas (OpenAI reference order, bounds on fields), OpenAI error shape
- schemas.py    pydantic models of the replies, for /openapi.json only (the routes return plain dicts)
- app.py        `create_app(llm, ...)`: FastAPI app, thin routes, auth / body-limit / logging middlewares
- service.py    what the endpoints share: budgets, sampling defaults, driving jobs into Completions, SSE pump
- completions.py  /v1/completions (echo + prompt logprobs)
- chat.py       /v1/chat/completions (tools, response_format, n, logprobs)
- responses.py  /v1/responses (stored conversations, events)
- tokens.py     /tokenize, /detokenize, /tokenizer_info
- scheduler.py  continuous batching: one engine thread, rows join and leave between decode steps
- adapters.py   LoRA adapters served beside the base (`--adapter NAME=PATH`): shared base weights, a lane each
- ratelimit.py  requests / tokens per minute per API key (429 + Retry-After)
- store.py      SQLite store of responses (previous_response_id survives restarts)
- metrics.py    Prometheus text for /metrics
- static/       index.html, the one-page chat (no build step)
"""
