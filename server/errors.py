"""One error model for every front door: each error knows its status and whether a retry may help.

Code anywhere in the request path raises one of these (or ``models.spec.InputError``, which the
models raise without knowing the server); the front doors turn an exception into a reply with
``status_of`` alone. Anything else that escapes is a bug: a 500 that the front door logs once
with its traceback, and whose traceback never reaches the client.

Torch-free: the ZeroMQ client and the wire format import it too.
"""

from __future__ import annotations

from models.spec import InputError


class ServeError(Exception):
    """An expected failure of one request. ``status`` is HTTP's; ZeroMQ replies carry the same code."""

    status: int = 500
    retryable: bool = False  # True: the same request may succeed later or elsewhere (503 + Retry-After)

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequest(ServeError):
    status = 400


class Unauthorized(ServeError):
    """No valid ``Authorization: Bearer`` token (``auth_token_file``); HTTP adds ``WWW-Authenticate: Bearer``."""

    status = 401


class NotFound(ServeError, LookupError):
    status = 404


class MethodNotAllowed(ServeError):
    status = 405


class ClientTimeout(ServeError):
    """The client did not send its request in time (nginx: client_body_timeout)."""

    status = 408


class PayloadTooLarge(ServeError):
    status = 413


class UriTooLong(ServeError):
    status = 414


class HeadersTooLarge(ServeError):
    status = 431


class Overloaded(ServeError):
    """A queue is full: the client should retry later (HTTP 503 + Retry-After)."""

    status = 503
    retryable = True


class PeerUnavailable(Overloaded, ConnectionError):
    """A peer worker could not take a request before accepting it: safe to retry elsewhere."""


class Unavailable(Overloaded):
    """The server is draining or not ready for this model."""


class RequestTimeout(ServeError):
    """The request found no result within its deadline (a model's request_timeout, a peer's answer)."""

    status = 504


class RemoteError(ServeError):
    """A peer worker answered with an error: its status travels with it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, status)
        self.retryable = status == 503


def status_of(exc: BaseException) -> int:
    """The status a client gets for ``exc``: 500 means a bug, to be logged with its traceback."""
    if isinstance(exc, ServeError):
        return exc.status
    if isinstance(exc, InputError):
        return 400
    return 500


def from_status(status: int, message: str) -> Exception:
    """The exception for a status a peer sent back, so that it reaches our client unchanged."""
    if status == 400:
        return InputError(message)
    if status == 404:
        return NotFound(message)
    return RemoteError(status, message)
