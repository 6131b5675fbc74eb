"""The FastAPI echo app of bench/asgi_compare.py: the same app on every ASGI server and --ws setting.

    uvicorn asgi_fastapi_echo:app --ws fastws.asgi:FastWSProtocol   (or websockets-sansio, wsproto)
    granian --interface asgi asgi_fastapi_echo:app

Echoes every message back as it came (text as text, bytes as bytes), as FastAPI users write it.
"""

from __future__ import annotations

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI()


@app.websocket("/echo")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await websocket.send_text(message["text"])
            else:
                await websocket.send_bytes(message["bytes"])
    except WebSocketDisconnect:
        pass
