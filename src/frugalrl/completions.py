"""The text of a completion as TRL passes it to reward functions: a string or chat messages.

Kept apart from ``rewards/`` (which imports the tasks) so that the tasks' own reward functions
can use it too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string, or a chat message list whose last assistant
    message's content is taken (the last message when none has role "assistant").

    Content may be a string, ``None`` or a list of parts (``{"type": "text", "text": ...}``).
    Anything unusable gives ``""``.
    """
    try:
        if completion is None:
            return ""
        if isinstance(completion, str):
            return completion
        if isinstance(completion, dict):
            return _content_text(completion.get("content"))
        if isinstance(completion, Sequence):
            messages = [m for m in completion if isinstance(m, dict)]
            if not messages:
                return ""
            assistant = [m for m in messages if m.get("role") == "assistant"]
            return _content_text((assistant or messages)[-1].get("content"))
    except Exception:  # pragma: no cover - defensive
        logger.debug("unusable completion", exc_info=True)
    return ""


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal-style parts
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return ""
