"""Chat templates for VLM conversations: placeholder expansion and prompt label masking.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": ...}`` (LLaVA's
``{"from": "human" | "gpt", "value": ...}`` is accepted too). ``content`` is a string in which ``<image>`` /
``<video>`` mark where media go, or a list of Hugging Face style parts ``{"type": "text", "text": ...}``,
``{"type": "image"}``, ``{"type": "video"}``.

:func:`encode_conversation` renders the conversation with a :class:`ChatTemplate`, expands the i-th image to
``start + pad * n_i + end`` where ``n_i`` is what the image processor says the image costs (Qwen2-VL:
``grid_thw.prod() // merge**2``; InternVL: ``tiles * 256``), tokenizes, and returns ``loss_mask`` = 1 exactly
on the assistant replies and their end-of-turn token (the model learns what to say and when to stop, never
the prompt). Tokens are produced run by run (a run = consecutive text with the same label), so the mask is
exact for any tokenizer; with ChatML the runs meet at special tokens or newlines, where BPE never merges, and
the ids equal those of tokenizing the whole string (tested against ``transformers``' ``apply_chat_template``).

Example::

    >>> from functional_mm.data.text import ByteTokenizer
    >>> tok = ByteTokenizer(special_tokens=CHATML.special_tokens)
    >>> conv = [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "red"}]
    >>> out = encode_conversation(tok, CHATML, conv, image_tokens=[4])
    >>> tok.decode(out["tokens"][out["loss_mask"].bool()])
    'red<|im_end|>'
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import torch

_ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """How messages and media become text.

    ``assistant`` is ``(prefix, end, tail)``: the prefix belongs to the prompt, the reply and ``end`` are
    labelled, ``tail`` is not (ChatML: ``"<|im_start|>assistant\\n"``, ``"<|im_end|>"``, ``"\\n"``).
    ``image``/``video`` are ``(start, pad, end)``; ``pad`` is repeated once per vision token.
    ``eos_after_reply`` appends the tokenizer's eos id to every reply (labelled), for templates without an
    end-of-turn token (LLaVA "plain").
    """

    name: str
    system: tuple[str, str] = ("<|im_start|>system\n", "<|im_end|>\n")
    user: tuple[str, str] = ("<|im_start|>user\n", "<|im_end|>\n")
    assistant: tuple[str, str, str] = ("<|im_start|>assistant\n", "<|im_end|>", "\n")
    image: tuple[str, str, str] = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
    video: tuple[str, str, str] = ("<|vision_start|>", "<|video_pad|>", "<|vision_end|>")
    default_system: str | None = "You are a helpful assistant."
    bos: bool = False
    eos_after_reply: bool = False

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The marker strings a byte-level tokenizer must treat as single tokens for this template."""
        parts = [*self.system, *self.user, *self.assistant, *self.image, *self.video]
        found = [t for p in parts for t in re.findall(r"<\|[^|>]+\|>|<[A-Za-z_/]+>", p)]
        return tuple(dict.fromkeys(found))


# Qwen2-VL / Qwen2.5-VL (and any ChatML model): the published Qwen2-VL chat template, minus "Picture i:" ids.
CHATML = ChatTemplate("chatml")
# InternVL2.5/3: ChatML turns, each image as <img><IMG_CONTEXT>*n</img>.
INTERNVL = ChatTemplate(
    "internvl",
    image=("<img>", "<IMG_CONTEXT>", "</img>\n"),
    video=("<img>", "<IMG_CONTEXT>", "</img>\n"),
    default_system=None,
)
# LLaVA pre-training ("plain"): media then caption, no roles; the caption and eos are the labels.
PLAIN = ChatTemplate(
    "plain",
    system=("", ""),
    user=("", ""),
    assistant=("", "", ""),
    image=("", "<image>", "\n"),
    video=("", "<video>", "\n"),
    default_system=None,
    bos=True,
    eos_after_reply=True,
)
TEMPLATES = {t.name: t for t in (CHATML, INTERNVL, PLAIN)}


def _parts(content: Any) -> list[tuple[str, str]]:
    """Content as ``[(kind, text)]`` with kind in {"text", "image", "video"}."""
    if isinstance(content, str):
        out = []
        for i, piece in enumerate(re.split(r"(<image>|<video>)", content)):
            if i % 2:
                out.append((piece[1:-1], ""))
            elif piece:
                out.append(("text", piece))
        return out
    out = []
    for p in content:
        kind = p.get("type", "text")
        if kind not in ("text", "image", "video"):
            raise ValueError(f"unknown content part type {kind!r} (expected text, image or video)")
        out.append((kind, p.get("text", "") if kind == "text" else ""))
    return out


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """``{"role", "content"}`` messages from either HF (role/content) or LLaVA (from/value) spelling."""
    out = []
    for m in messages:
        role = m.get("role", m.get("from"))
        if role not in _ROLES:
            raise ValueError(f"unknown chat role {role!r}; expected one of {sorted(_ROLES)}")
        out.append({"role": _ROLES[role], "content": m.get("content", m.get("value", ""))})
    return out


def render(
    template: ChatTemplate,
    messages: Sequence[dict],
    *,
    image_tokens: Sequence[int] = (),
    video_tokens: Sequence[int] = (),
    add_generation_prompt: bool = False,
) -> list[tuple[str, bool]]:
    """The conversation as text runs ``[(text, labelled)]``; consecutive runs alternate in label.

    With ``image_tokens=[1, ...]`` the output is the template's text with unexpanded placeholders, which is
    what ``apply_chat_template(tokenize=False)`` returns.
    """
    messages = normalize_messages(messages)
    runs: list[tuple[str, bool]] = []

    def emit(text: str, labelled: bool) -> None:
        if not text:
            return
        if runs and runs[-1][1] == labelled:
            runs[-1] = (runs[-1][0] + text, labelled)
        else:
            runs.append((text, labelled))

    counts = {"image": 0, "video": 0}
    budgets = {"image": list(image_tokens), "video": list(video_tokens)}

    def content_text(content: Any) -> str:
        text = ""
        for kind, t in _parts(content):
            if kind == "text":
                text += t
                continue
            i = counts[kind]
            counts[kind] += 1
            if i >= len(budgets[kind]):
                raise ValueError(
                    f"the conversation has more {kind} placeholders than the {len(budgets[kind])} given"
                )
            start, pad, end = template.image if kind == "image" else template.video
            text += start + pad * int(budgets[kind][i]) + end
        return text

    if template.default_system is not None and (not messages or messages[0]["role"] != "system"):
        emit(template.system[0] + template.default_system + template.system[1], False)
    for m in messages:
        body = content_text(m["content"])
        if m["role"] == "assistant":
            prefix, end, tail = template.assistant
            emit(prefix, False)
            emit(body + end, True)
            emit(tail, False)
        else:
            prefix, suffix = template.system if m["role"] == "system" else template.user
            emit(prefix + body + suffix, False)
    if add_generation_prompt:
        emit(template.assistant[0], False)
    for kind in counts:
        if counts[kind] != len(budgets[kind]):
            raise ValueError(
                f"{len(budgets[kind])} {kind} token counts given but the conversation has {counts[kind]} "
                f"{kind} placeholders"
            )
    return runs


def encode_conversation(
    tokenizer,
    template: ChatTemplate,
    messages: Sequence[dict],
    *,
    image_tokens: Sequence[int] = (),
    video_tokens: Sequence[int] = (),
    add_generation_prompt: bool = False,
) -> dict[str, torch.Tensor]:
    """``{"tokens": int64 [T], "loss_mask": int64 [T]}`` for one conversation (see the module docstring).

    ``image_tokens[i]`` / ``video_tokens[i]``: the number of vision tokens of the i-th image / video.
    """
    ids: list[int] = []
    mask: list[int] = []
    if template.bos:
        if tokenizer.bos is None:
            raise ValueError(f"template {template.name!r} starts with bos but the tokenizer has none")
        ids.append(tokenizer.bos)
        mask.append(0)
    runs = render(
        template,
        messages,
        image_tokens=image_tokens,
        video_tokens=video_tokens,
        add_generation_prompt=add_generation_prompt,
    )
    for text, labelled in runs:
        piece = tokenizer.encode(text)
        if labelled and template.eos_after_reply:
            piece.append(tokenizer.eos)
        ids += piece
        mask += [int(labelled)] * len(piece)
    return {
        "tokens": torch.tensor(ids, dtype=torch.int64),
        "loss_mask": torch.tensor(mask, dtype=torch.int64),
    }
