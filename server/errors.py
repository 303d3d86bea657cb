"""The one refusal type of every service (Translator, Reader, the HTTP gateway): a gRPC status
code and a message for the client."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request (or stream item) refused with this status code. The codes are gRPC's (the
    google.rpc.Code set), whatever the transport: the HTTP gateway maps them to HTTP statuses.
    `reason` refines a code where a transport answers differently (an HTTP client with a missing
    key gets 400 from the LibreTranslate API, one with a wrong key 403)."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "", retry_after: float = 0.0):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.retry_after = retry_after
