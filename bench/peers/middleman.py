"""The middleman set-up of bench/processing.py: a FastAPI service that tokenizes text and calls pyserving.

It receives POST /classify {"text": "..."}, tokenizes with the same code as the model's processing.py
(text_tokenizer.py beside this file), posts the ids to pyserving's REST :predict with one shared
httpx.AsyncClient (a keep-alive connection pool), and answers {"labels": [...]} with the class names.

Started by bench/processing.py in its own virtualenv (bench/setup makes bench/.venvs/middleman), one uvicorn
worker on 127.0.0.1:
    python middleman.py PORT PREDICT_URL MODEL_VERSION_FOLDER
"""

import contextlib
import sys

import httpx
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from text_tokenizer import Tokenizer

port, predict_url, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
tokenizer = Tokenizer(folder)
client: httpx.AsyncClient | None = None


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    global client
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    async with httpx.AsyncClient(limits=limits, timeout=60) as pool:
        client = pool
        yield


app = FastAPI(lifespan=lifespan)


class TextIn(BaseModel):
    text: str


@app.post("/classify")
async def classify(body: TextIn) -> dict:
    ids = tokenizer.encode([body.text])
    response = await client.post(predict_url, json={"instances": ids.tolist()})
    if response.status_code != 200:
        raise HTTPException(502, f"pyserving answered {response.status_code}: {response.text[:200]}")
    predictions = response.json()["predictions"]
    return {"labels": tokenizer.names(p["classes"] for p in predictions)}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=port, workers=1, log_level="warning", access_log=False)
