"""Draft generator settings and the client of an OpenAI-compatible chat endpoint.

``DraftConfig`` is the ``[draft]`` table of the serve config. ``generator = "compose"``
(the default) drafts offline by retrieval-based composition (``medseek.search.draft``);
``"llm"`` sends the same concept-enriched context (``medseek.search.draft_prompt``) to a
chat-completions endpoint: a llama.cpp server, vLLM or Ollama, each of which speaks
``POST <endpoint>/chat/completions``. The client is the standard library's HTTP: nothing
to install, and an endpoint that is down is a ``ConnectionError`` (UNAVAILABLE to the
caller), one that is too slow a ``TimeoutError``.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ChatClient", "DraftConfig"]

GENERATORS = ("compose", "llm")


@dataclass(frozen=True)
class DraftConfig:
    """How ``Draft`` writes its report.

    Attributes
    ----------
    generator : {"compose", "llm"}
        Offline composition, or a chat model behind ``endpoint``.
    k : int >= 1
        Retrieved cases whose reports feed the draft.
    endpoint : str, optional
        Base URL of the OpenAI-compatible API, e.g. ``http://127.0.0.1:8080/v1`` (required
        with ``generator = "llm"``).
    model : str
        Model name sent with each request (llama.cpp ignores it; vLLM and Ollama need it).
    timeout_s : float > 0
        Per request.
    api_key_file : Path, optional
        File holding the bearer key (never the key inline).
    max_tokens : int >= 1
    """

    generator: str = "compose"
    k: int = 5
    endpoint: str | None = None
    model: str = ""
    timeout_s: float = 60.0
    api_key_file: Path | None = None
    max_tokens: int = 512

    def __post_init__(self) -> None:
        if self.generator not in GENERATORS:
            raise ValueError(f"draft.generator must be one of {GENERATORS}, got "
                             f"{self.generator!r}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"draft.k must be an int >= 1, got {self.k!r}")
        if self.generator == "llm" and not self.endpoint:
            raise ValueError("draft.endpoint is required with generator 'llm'")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"draft.endpoint must be an http(s) URL, got {self.endpoint!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"draft.timeout_s must be > 0, got {self.timeout_s}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"draft.max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if self.api_key_file is not None:
            object.__setattr__(self, "api_key_file", Path(self.api_key_file))


class ChatClient:
    """``complete(messages) -> str`` against ``config.endpoint`` (temperature 0)."""

    def __init__(self, config: DraftConfig) -> None:
        if not config.endpoint:
            raise ValueError("ChatClient needs DraftConfig.endpoint")
        self.config = config
        self.url = config.endpoint.rstrip("/") + "/chat/completions"
        self._key = (config.api_key_file.read_text().strip()
                     if config.api_key_file is not None else None)

    def complete(self, messages: list[dict]) -> str:
        """The first choice's message content.

        Raises
        ------
        ConnectionError
            The endpoint cannot be reached or answers with an HTTP error.
        TimeoutError
            No answer within ``timeout_s``.
        ValueError
            The answer is not chat-completions JSON.
        """
        body = json.dumps({"model": self.config.model, "messages": messages,
                           "temperature": 0, "max_tokens": self.config.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.config.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:  # (a URLError: check it first)
            raise ConnectionError(f"draft endpoint answered HTTP {exc.code}") from None
        except (socket.timeout, TimeoutError):
            raise TimeoutError(f"draft endpoint gave no answer within "
                               f"{self.config.timeout_s} s") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (socket.timeout, TimeoutError)):
                raise TimeoutError(f"draft endpoint gave no answer within "
                                   f"{self.config.timeout_s} s") from None
            raise ConnectionError(f"draft endpoint unreachable: {exc.reason}") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError("draft endpoint's answer is not chat-completions JSON "
                             "(choices[0].message.content)") from None
        if not isinstance(content, str):
            raise ValueError("draft endpoint's choices[0].message.content is not a string")
        return content
