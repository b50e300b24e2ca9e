"""Bearer-token authentication as a ``grpc.aio`` server interceptor.

A call must carry ``authorization: Bearer <token>`` with a token of ``ServeConfig.tokens``
(compared in constant time); otherwise it is answered UNAUTHENTICATED before any handler
runs. Health checking and reflection stay open (load balancers probe them without
credentials; they reveal no data). No token, valid or not, is ever logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

import grpc

PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def unary(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)


def bearer_token(metadata) -> bytes | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            value = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token:
                return None
            return token.strip().encode()
    return None


def caller_name(metadata, named_tokens: Sequence[tuple[str, str]]) -> str | None:
    """The name of the ``(name, token)`` pair whose token the call carries, or None.

    Every pair is compared (constant time, no early exit), so the answer's timing does not
    say which name matched. This is the authorisation of a role (e.g. clinical
    re-identification, ``ServeConfig.reident_tokens``), on top of the interceptor's
    authentication.
    """
    given = bearer_token(metadata)
    if given is None:
        return None
    found = None
    for name, token in named_tokens:
        if hmac.compare_digest(given, token.encode()) and found is None:
            found = name
    return found


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without an accepted bearer token (module docstring)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("tokens must name at least one accepted token")
        self._tokens = [t.encode() for t in tokens]

    def _accepted(self, metadata) -> bool | None:
        """True: accepted; False: wrong token; None: no bearer token at all."""
        given = bearer_token(metadata)
        if given is None:
            return None
        ok = False
        for t in self._tokens:  # no early exit: constant time over the list
            ok |= hmac.compare_digest(given, t)
        return ok

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(PUBLIC_PREFIXES):
            return await continuation(handler_call_details)
        verdict = self._accepted(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if verdict or handler is None:
            return handler
        why = "missing bearer token" if verdict is None else "invalid bearer token"
        return _deny(handler, why)
