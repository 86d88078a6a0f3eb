"""Access and size checks in front of the routes: API keys (401) and body size (413), before a byte of a body is
parsed."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from jsonextract.config.serve import LimitsConfig, ServeConfig


class GuardSettings:
    """What Guard enforces in this replica process; set by Api.__init__ (Serve builds the ASGI app itself)."""
    key_hashes: list[bytes] = []
    max_body: int = LimitsConfig.max_body_bytes

class Guard:
    """Access and size checks before FastAPI reads a byte of the body: API keys (401) and body size (413).
    Pure ASGI, so a refused body is never read, parsed or tokenised."""

    OPEN = {"/healthz", "/"}  # liveness, and the page (static; the calls it makes need the key)

    def __init__(self, asgi_app):
        self.app = asgi_app

    @property
    def key_hashes(self) -> list[bytes]:
        return GuardSettings.key_hashes

    @property
    def max_body(self) -> int:
        return GuardSettings.max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.key_hashes and scope.get("path") not in self.OPEN and not self.authorised(headers):
            return await refuse(send, 401, "missing or invalid API key (send Authorization: Bearer <key>)",
                                [(b"www-authenticate", b"Bearer")])
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await refuse(send, 413, f"request body over this deployment's limit of {self.max_body} bytes")
        if length is None and scope.get("method") in ("POST", "PUT", "PATCH"):  # chunked: count as it arrives
            body, more = b"", True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                body += msg.get("body", b"")
                more = msg.get("more_body", False)
                if len(body) > self.max_body:
                    return await refuse(send, 413, f"request body over this deployment's limit of "
                                                   f"{self.max_body} bytes")
            replayed = False

            async def receive_again():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()
            return await self.app(scope, receive_again, send)
        return await self.app(scope, receive, send)

    def authorised(self, headers: dict) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            return False
        digest = hashlib.sha256(key.strip().encode()).digest()
        # compare against every key, in constant time each: timing tells nothing about which key or how much
        return sum(hmac.compare_digest(digest, h) for h in self.key_hashes) > 0

async def refuse(send, status: int, detail: str, extra: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                + (extra or [])})
    await send({"type": "http.response.body", "body": body})

def key_hashes(cfg: ServeConfig) -> list[bytes]:
    """SHA-256 of each API key (from $JSONEXTRACT_API_KEYS and api_keys_file): the deployment's arguments, which
    Ray shows on its dashboard, never hold a key itself."""
    keys = [k.strip() for k in os.environ.get("JSONEXTRACT_API_KEYS", "").split(",")]
    if cfg.api_keys_file:
        keys += [k.strip() for k in Path(cfg.api_keys_file).read_text().splitlines()]
    return [hashlib.sha256(k.encode()).digest() for k in keys if k and not k.startswith("#")]
