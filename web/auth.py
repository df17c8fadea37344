"""Who may talk to covid-cxr's HTTP endpoints: anyone on this machine by default, token holders elsewhere."""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress

from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from covid_cxr.errors import ConfigurationError

#: Host names that never leave this machine.
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) reaches this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, token: SecretStr | None) -> None:
    """Refuse to listen on an interface other machines can reach without a token to ask for."""
    if token is None and not is_loopback(host):
        raise ConfigurationError(
            f"refusing to listen on {host} without a token: set COVID_CXR_WEB_TOKEN (e.g. `openssl rand -hex 16`), "
            f"or listen on 127.0.0.1 only")


def presented_token(headers: Headers) -> str | None:
    """The token of ``Authorization: Bearer TOKEN``, or the password of ``Authorization: Basic`` (any user name)."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


class TokenGuard:
    """ASGI middleware: with a token configured, every request must present it (compared in constant time).

    Browsers are answered with a basic-auth challenge, so an operator types the token as the password.
    """

    def __init__(self, app: ASGIApp, token: SecretStr | None) -> None:
        self.app = app
        self._expected = token.get_secret_value().encode() if token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._expected is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = presented_token(Headers(scope=scope))
        if given is not None and hmac.compare_digest(given.encode(), self._expected):
            await self.app(scope, receive, send)
            return
        response = PlainTextResponse(
            "a token is required: Authorization: Bearer TOKEN (or the token as the basic-auth password)\n",
            status_code=401, headers={"WWW-Authenticate": 'Basic realm="covid-cxr", charset="UTF-8"'})
        await response(scope, receive, send)
