"""Prompt and response rendering: the tokenizer's chat template, the PKU/Safe-RLHF template, or raw text.

``chat``  ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``.
``pku``   ``BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:`` (Safe-RLHF's template); earlier turns alternate
          ``USER: ... ASSISTANT: ...``, and a system prompt follows ``BEGINNING OF CONVERSATION:``.
``raw``   a string prompt as it is (HH transcripts); chat messages are written as an HH transcript
          (``\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:``); a system prompt is prepended verbatim.

With the plain templates (``pku``, ``raw``) a response gets one leading space when neither the prompt ends nor the
response starts with whitespace, so ``ASSISTANT:`` and ``Assistant:`` are followed by `` reply`` as in the original
data.
"""

from __future__ import annotations

from typing import Any, Literal

from sacpo_lightning.errors import UserError

__all__ = ["PKU_BEGIN", "TEMPLATES", "as_messages", "hh_transcript", "render_prompt", "render_response"]

Template = Literal["chat", "pku", "raw"]
TEMPLATES = ("chat", "pku", "raw")
PKU_BEGIN = "BEGINNING OF CONVERSATION:"


def as_messages(prompt: list[dict[str, str]] | str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """Chat messages of a prompt; a string becomes one user turn, ``system_prompt`` a leading system turn.

    A system prompt is not added when the messages already start with one.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def hh_transcript(messages: list[dict[str, str]]) -> str:
    """Writes messages as an HH-RLHF transcript ending with ``\\n\\nAssistant:`` (system text first, verbatim)."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"])
        else:
            parts.append(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}")
    return "".join(parts) + "\n\nAssistant:"


def _pku(messages: list[dict[str, str]]) -> str:
    parts = [PKU_BEGIN]
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"])
        else:
            parts.append(f"{'USER' if m['role'] == 'user' else 'ASSISTANT'}: {m['content']}")
    parts.append("ASSISTANT:")
    return " ".join(parts)


def render_prompt(
    prompt: list[dict[str, str]] | str,
    template: Template,
    tokenizer: Any | None = None,
    system_prompt: str | None = None,
) -> str:
    """Renders a prompt (messages or string) as text that the response directly follows.

    Args:
        prompt: Chat messages ending with a user turn, or a string.
        template: ``chat``, ``pku`` or ``raw`` (see the module docstring).
        tokenizer: Needed for ``chat``: its chat template is applied with ``add_generation_prompt=True``.
        system_prompt: Optional system text.

    Raises:
        ValueError: for an unknown template, or ``chat`` with a tokenizer that has no chat template.
    """
    if template == "raw":
        if isinstance(prompt, str):
            return prompt if system_prompt is None else system_prompt + prompt
        return hh_transcript(as_messages(prompt, system_prompt))
    if template == "pku":
        return _pku(as_messages(prompt, system_prompt))
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", None)
            raise UserError(
                f"--data.template chat needs a tokenizer with a chat template, and {name!r} has none; "
                "use --data.template pku (or raw)."
            )
        return tokenizer.apply_chat_template(as_messages(prompt, system_prompt), add_generation_prompt=True,
                                             tokenize=False)
    raise UserError(f"--data.template must be one of {', '.join(TEMPLATES)}; got {template!r}.")


def render_response(text: str, template: Template, prompt_text: str) -> str:
    """The response text as it follows the rendered prompt (one space added for the plain templates, see above)."""
    if template in ("pku", "raw") and text[:1] and not text[:1].isspace() and not prompt_text[-1:].isspace():
        return " " + text
    return text
