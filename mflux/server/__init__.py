"""`mflux serve`: OpenAI's Images API, the A1111 API and a web page over a queue whose worker owns the
model: a thread of the server, or one process per device (`--workers`, `--devices`).

app.py         the FastAPI app: routers, the key and body-size guard, the error shapes
core.py        settings, limits, errors, names, image decoding, running a job
worker.py      the bounded FIFO queue, its runners' threads, and the one adapter over Flux1 (execute)
process.py     worker processes: the parent's ProcessRunner and the process's own loop
openai_api.py  /v1/images/generations, /v1/images/edits, /v1/models
a1111_api.py   /sdapi/v1/*
mflux_api.py   /mflux/v1/*, what the web page speaks
ui/            the web page (no CDN, no analytics)
"""
