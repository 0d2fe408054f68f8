"""Chat prompts rendered with the model's own Jinja template, read from the GGUF.

No template is ever written here: the text comes from the model's
``tokenizer.chat_template`` metadata, rendered the way Hugging Face
tokenizers render it (sandboxed Jinja, ``messages``, ``add_generation_prompt``,
``bos_token``/``eos_token``, and ``raise_exception``).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tightwad.errors import InvalidRequest


class TemplateError(InvalidRequest):
    pass


def _raise(message: str) -> None:
    raise TemplateError(f"chat template refused the messages: {message}", param="messages")


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str, eos_token: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self.source = source
        self._template = env.from_string(source)
        self._bos = bos_token
        self._eos = eos_token

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        validate_messages(messages)
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos,
                eos_token=self._eos,
                tools=tools,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed: {exc}", param="messages") from exc


def validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidRequest(f"'messages[{i}]' must be an object", param=f"messages[{i}]")
        role = msg.get("role")
        if role not in ("system", "user", "assistant", "tool", "developer"):
            raise InvalidRequest(
                f"'messages[{i}].role' must be system, user, assistant or tool, got {role!r}",
                param=f"messages[{i}].role",
            )
        content = msg.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequest(
                f"'messages[{i}].content' must be a string or a list of parts",
                param=f"messages[{i}].content",
            )
        if isinstance(content, list):
            # OpenAI content parts: only text parts can reach a text model.
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str
                ):
                    raise InvalidRequest(
                        f"'messages[{i}].content[{j}]' must be a text part", param=f"messages[{i}].content"
                    )
                texts.append(part["text"])
            msg["content"] = "".join(texts)
