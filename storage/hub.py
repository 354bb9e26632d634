"""Whether the Hugging Face hub answers, checked once in two seconds instead of retried for half a minute.

transformers and datasets retry every hub request for ~25-30 s and print a line each time before they give
up. A machine without the hub should fail in seconds, and still load what its local cache holds.
"""
from __future__ import annotations

import os

HUB_CONNECT_TIMEOUT = 2.0


def hub_reachable(timeout: float = HUB_CONNECT_TIMEOUT) -> bool:
    """Whether a TCP connection to the Hugging Face hub endpoint opens within timeout seconds."""
    import socket
    import threading
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return False
    reached: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    # In a thread: a name lookup can hang far longer than the socket's timeout, and nothing can cancel it.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(reached)


def go_offline() -> None:
    """Put this process's hub clients in offline mode: cached models and datasets still load, nothing retries."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True  # read at import time by huggingface_hub; set it for this process too
    try:
        import datasets.config
    except ImportError:  # datasets is optional (tierprune[hub])
        return
    datasets.config.HF_HUB_OFFLINE = True


def hub_or_offline() -> bool:
    """Whether the hub answers; if not, this process goes offline (see go_offline)."""
    if hub_reachable():
        return True
    go_offline()
    return False
