"""Keeping the API key out of log lines, including the ones websockets writes for us.

At DEBUG level websockets logs every frame it sends and receives (``> TEXT '{"action":"auth",
"params":"<key>"}'``), so the client and the simulator hand websockets a logger of their own
that carries ``RedactingFilter``: any record showing an ``auth`` action, or the text of a
registered secret, is rewritten before a handler sees it.
"""

from __future__ import annotations

import logging
from typing import Final

from libs.common.runtime.settings import Secret

AUTH_MARKER: Final = '"action":"auth"'
"""How an auth message starts on the wire (``ClientAction`` encodes ``action`` first)."""
MASK: Final = "***"
MIN_SECRET_CHARS: Final = 4
"""Shorter secrets are not searched for in text (they would mask ordinary words); the auth
message itself is always masked."""

CLIENT_LOGGER: Final = "websockets.client.ingest"
SERVER_LOGGER: Final = "websockets.server.simulator"


def redact(text: str, secrets: frozenset[str] | set[str] = frozenset()) -> str:
    """``text`` with an auth message's parameters and every secret's text masked."""
    if AUTH_MARKER in text:
        head = text.split(AUTH_MARKER, 1)[0]
        text = f'{head}{AUTH_MARKER},"params":"{MASK}"}} (auth message redacted)'
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites records that would show an auth message or a registered secret."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def add(self, secret: Secret) -> None:
        """Mask ``secret`` wherever it appears (when it is long enough to search for)."""
        value = secret.reveal()
        if len(value) >= MIN_SECRET_CHARS:
            self.secrets.add(value)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a badly formatted record is not ours to fix
            return True
        cleaned = redact(message, self.secrets)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        return True


_FILTER = RedactingFilter()


def redacting_logger(name: str, secret: Secret | None = None) -> logging.Logger:
    """The stdlib logger ``name`` with the process's redacting filter; registers ``secret``.

    Use a name under ``websockets.`` so the level set for websockets still applies.
    """
    if secret is not None:
        _FILTER.add(secret)
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
