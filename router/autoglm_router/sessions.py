"""Where a request's session and user come from (pure: headers and the parsed JSON body in, a key out).

``sessionKey`` (the resource's ``spec.router.sessionKey``) is one of

- ``prompt`` (default): a hash of the system prompt and the first user message's text (image parts
  ignored). For the phone agent that is one task: every step repeats them and adds screenshots and
  turns after them. For ``/v1/completions`` the first ``PROMPT_PREFIX_CHARS`` characters of the prompt.
- ``user``: the OpenAI ``user`` field (falling back to ``prompt`` when absent).
- ``header:<name>``: that request header (falling back to ``prompt`` when absent).

The canary's user is the ``user`` field, else the ``USER_HEADER`` header, else the session key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

PROMPT_PREFIX_CHARS = 256
USER_HEADER = "x-autoglm-user"
SESSION_KEY_PATTERN = r"^(prompt|user|header:[A-Za-z0-9][-A-Za-z0-9_]*)$"


def validate_session_key(source: str) -> str:
    if not re.fullmatch(SESSION_KEY_PATTERN, source):
        raise ValueError(f"sessionKey must be prompt, user or header:<name>, got {source!r}")
    return source


def _text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def prompt_key(body: Mapping[str, Any]) -> str:
    """Hash of the system prompt(s) + first user message (chat) or of the prompt's start (completions)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        system = [_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "system"]
        first_user = next((m for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
        text = "\x00".join(system) + "\x01" + (_text(first_user.get("content")) if first_user else "")
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0]
        text = "\x02" + (
            prompt[:PROMPT_PREFIX_CHARS] if isinstance(prompt, str) else repr(prompt)[:PROMPT_PREFIX_CHARS]
        )
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def session_key(source: str, headers: Mapping[str, str], body: Mapping[str, Any]) -> str:
    """The session key of one request under ``source`` (see the module doc)."""
    if source == "user":
        user = body.get("user")
        if isinstance(user, str) and user:
            return "user:" + user
    elif source.startswith("header:"):
        value = headers.get(source.removeprefix("header:"))
        if value:
            return "header:" + value
    return "prompt:" + prompt_key(body)


def canary_user(headers: Mapping[str, str], body: Mapping[str, Any], session: str) -> str:
    user = body.get("user")
    if isinstance(user, str) and user:
        return user
    return headers.get(USER_HEADER) or session
