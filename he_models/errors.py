"""The one exception base that means "the caller's input is wrong".

Every room raises a subclass of ClientInputError when it refuses what a client sent (bad frames, wrong
level, a replayed round, a malformed key bundle). The service answers those with a 4xx; any other
exception is a bug or an outage and is answered 500 and logged, so an engine bug never looks like bad
client input. It lives in he_models because that room imports nothing else; every other room may use it.
"""

from __future__ import annotations


class ClientInputError(ValueError):
    """Input refused because the caller sent something wrong (answered 4xx by the service)."""
