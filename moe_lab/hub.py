"""A fast check that the Hugging Face Hub is reachable, so loaders fail in seconds instead of retrying."""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlsplit

DEFAULT_ENDPOINT = "https://huggingface.co"
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = ("1", "ON", "YES", "TRUE")  # the values huggingface_hub reads as true


class HubUnavailableError(RuntimeError):
    """The Hugging Face Hub cannot be reached (offline mode, no network, or a closed endpoint)."""


def hub_endpoint() -> str:
    """The Hub URL in use: $HF_ENDPOINT or huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "").strip() or DEFAULT_ENDPOINT


def hub_offline() -> bool:
    """Whether offline mode is switched on by HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE."""
    return any(os.environ.get(var, "").strip().upper() in _TRUE for var in _OFFLINE_VARS)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub's host opens within `timeout` seconds (False in offline mode)."""
    if hub_offline():
        return False
    url = urlsplit(hub_endpoint())
    if not url.hostname:
        return False
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
    except ValueError:  # a malformed port in HF_ENDPOINT
        return False
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((url.hostname, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # The socket timeout does not cover DNS resolution, which can hang for long: a daemon thread bounds both.
    thread = threading.Thread(target=connect, name="moe-lab-hub-check", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def hub_unavailable_error(what: str, hint: str) -> HubUnavailableError:
    """The error `require_hub` raises, for callers that first try a local fallback."""
    why = "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)" if hub_offline() else "no connection"
    return HubUnavailableError(f"{what}: the Hugging Face Hub ({hub_endpoint()}) is unreachable ({why}). {hint}")


def require_hub(what: str, hint: str) -> None:
    """Raise HubUnavailableError naming `what` and suggesting `hint` unless the Hub is reachable."""
    if not hub_reachable():
        raise hub_unavailable_error(what, hint)
