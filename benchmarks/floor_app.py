"""The framework floor: a trivial FastAPI endpoint that parses a payment-sized JSON body
with pydantic (the payment endpoint's own model) and returns a small JSON answer.

Served by uvicorn exactly like the service (`uvicorn.run(..., workers=N)`, uvloop and
httptools when installed, access log off), so `benchmarks/floor_ratio.py` measures what
the engine costs on top of the framework."""

from __future__ import annotations

import sys

from fastapi import FastAPI

from api.schemas import PaymentIn

app = FastAPI(title="floor")


@app.post("/floor", status_code=201)
async def floor(body: PaymentIn):
    return {"payment_id": body.payment_id, "status": "accepted"}


@app.get("/healthz")
async def healthz():
    return {"status": "ok"}


if __name__ == "__main__":  # python -m benchmarks.floor_app PORT WORKERS
    import uvicorn

    uvicorn.run("benchmarks.floor_app:app", host="127.0.0.1", port=int(sys.argv[1]), workers=int(sys.argv[2]),
                log_level="warning", access_log=False)
