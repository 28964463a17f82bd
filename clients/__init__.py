"""The cipherbert SDK: `from clients import Client` (httpx, numpy, tenseal; never torch or fastapi)."""

from clients.client_half import ClientHalf, HEModelsClientHalf, KeySet, TextEmbedder
from clients.sdk import CipherbertError, Client, Result, Session
from clients.tagging import TagResult

__all__ = [
    "CipherbertError",
    "Client",
    "ClientHalf",
    "HEModelsClientHalf",
    "KeySet",
    "Result",
    "Session",
    "TagResult",
    "TextEmbedder",
]
