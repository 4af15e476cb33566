"""GeoChat's conversation templates, rendering, and the token/label layout of a training sample.

Byte-for-byte what GeoChat (LLaVA-1.5's ``conversation.py``, separator style TWO) produces:

    system + " " + "USER: " + q1 + " " + "ASSISTANT: " + a1 + "</s>" + "USER: " + q2 + " " + ...

with ``<image>`` moved to the front of the first human turn as ``"<image>\\n" + text``. An open assistant slot
(evaluation) renders as ``"ASSISTANT:"``.

Labels follow GeoChat's ``preprocess_v1`` bookkeeping exactly (split the rendered text at ``</s>``, then at
``" ASSISTANT: "``, count tokens per part, mask the instruction part): answers and their ``</s>`` are supervised,
BOS, system, user turns, the ``ASSISTANT:`` tags, image positions and anything after the last round are masked.
Where that bookkeeping disagrees with the real token count GeoChat prints "tokenization mismatch" and masks the
sample; we do the same masking but return the fact, so the loader counts and reports such samples.

Truncation rule: the text sequence (with the image as ONE placeholder id) keeps its first ``max_length`` tokens;
the image block is expanded to ``num_image_tokens`` ids only afterwards (GeoChat truncates before the expansion too),
so a cut can never fall inside it. The placeholder follows the system prompt and ``USER:``; a ``max_length`` so small
that it would cut the placeholder itself is reported as ``image_dropped`` (the loader skips and counts such samples,
since the image features would have nowhere to go).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Template:
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"


TEMPLATES = {
    "vicuna_v1": Template(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."),
    "llava_v1": Template(
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def image_to_front(text: str) -> str:
    """LLaVA's ``preprocess_multimodal``: drop ``<image>`` wherever it is and put ``"<image>\\n"`` in front."""
    return (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()


def render(conversations: list[dict], template: str = "vicuna_v1", *, open_answer: bool = False) -> str:
    """Render ``[{"from": "human"|"gpt", "value": str}, ...]``; ``open_answer`` appends ``"ASSISTANT:"``.

    The caller guarantees alternation from human (data_prep rejects anything else).
    """
    tpl = get_template(template)
    seps = (tpl.sep, tpl.sep2)
    text = tpl.system + tpl.sep
    for index, turn in enumerate(conversations):
        value = turn["value"]
        if index == 0 and IMAGE_TOKEN in value:
            value = image_to_front(value)
        text += tpl.roles[index % 2] + ": " + value + seps[index % 2]
    if open_answer:
        text += tpl.roles[1] + ":"
    return text


def render_eval_prompt(question: str, *, has_image: bool = True, template: str = "llava_v1") -> str:
    """The single-turn evaluation prompt: ``<system> USER: <image>\\nQ ASSISTANT:``."""
    value = IMAGE_TOKEN + "\n" + question if has_image and IMAGE_TOKEN not in question else question
    return render([{"from": "human", "value": value}], template, open_answer=True)


def chat_template(template: str = "llava_v1") -> str:
    """A Jinja chat template (transformers' ``apply_chat_template``) that renders exactly what ``render`` renders.

    Messages are ``{"role": "user"|"assistant", "content": str | [{"type": "image"} | {"type": "text", ...}]}``;
    an optional leading ``{"role": "system", ...}`` replaces the template's system prompt. The image (an
    ``{"type": "image"}`` item or a literal ``<image>``) is moved to the front of the first turn as ``"<image>\\n"``
    (``image_to_front``); an image item in a later turn is refused: GeoChat takes one image per conversation.
    ``add_generation_prompt`` appends the open ``"ASSISTANT:"`` slot (``render(..., open_answer=True)``).
    """
    tpl = get_template(template)

    def quoted(text: str) -> str:  # a Jinja string literal (JSON's escaping is valid Jinja)
        return json.dumps(text)

    user, assistant = (quoted(role + ": ") for role in tpl.roles)
    return (
        "{%- set ns = namespace(system=" + quoted(tpl.system) + ") -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}"
        "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join(' ') -%}{%- endif -%}"
        "{%- set messages = messages[1:] -%}"
        "{%- endif -%}"
        "{{- ns.system + " + quoted(tpl.sep) + " -}}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}"
        "{%- set text = message['content'] -%}{%- set has_image = " + quoted(IMAGE_TOKEN) + " in text -%}"
        "{%- else -%}"
        "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
        "| join(' ') -%}"
        "{%- set has_image = message['content'] | selectattr('type', 'equalto', 'image') | list | length > 0 -%}"
        "{%- endif -%}"
        "{%- if has_image and loop.first -%}"
        "{%- set text = (" + quoted(IMAGE_TOKEN + "\n") + " + (text | replace(" + quoted(IMAGE_TOKEN) + ", '') "
        "| trim)) | trim -%}"
        "{%- elif has_image and message['content'] is not string -%}"
        "{{- raise_exception('GeoChat takes one image, in the first user turn') -}}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}{{- " + user + " + text + " + quoted(tpl.sep) + " -}}"
        "{%- else -%}{{- " + assistant + " + text + " + quoted(tpl.sep2) + " -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + quoted(tpl.roles[1] + ":") + " -}}{%- endif -%}"
    )


def tokenize_with_image(text: str, tokenizer, image_token_id: int) -> list[int]:
    """LLaVA's ``tokenizer_image_token``: encode the chunks between ``<image>`` and join them with one placeholder.

    Each chunk is encoded on its own (with its BOS, which is then dropped for all but the first), exactly as GeoChat
    does; this is why ``"\\n"`` after the image is encoded with a dummy-prefix piece.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in text.split(IMAGE_TOKEN)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for index, chunk in enumerate(chunks):
        if index > 0:
            ids.append(image_token_id)
        ids.extend(chunk[offset:])
    return ids


@dataclass
class EncodedSample:
    input_ids: list[int]       # (L,) text ids with the image expanded to num_image_tokens placeholder ids
    labels: list[int]          # (L,) IGNORE_INDEX where unsupervised
    mismatch: bool             # GeoChat's bookkeeping disagreed: the whole sample is masked (counted by callers)
    truncated: bool            # the text was longer than max_length
    image_dropped: bool = False  # the cut removed the image placeholder: unusable with pixel values


def encode_conversation(conversations: list[dict], tokenizer, *, image_token_id: int, num_image_tokens: int,
                        template: str = "vicuna_v1", max_length: int = 2048) -> EncodedSample:
    """Render, tokenize and label one conversation the way GeoChat's ``preprocess_v1`` does."""
    tpl = get_template(template)
    text = render(conversations, template)
    has_image = IMAGE_TOKEN in text

    def count(piece: str) -> int:
        return len(tokenize_with_image(piece, tokenizer, image_token_id)) if has_image else len(tokenizer(piece).input_ids)

    input_ids = tokenize_with_image(text, tokenizer, image_token_id)
    labels = list(input_ids)
    answer_sep = tpl.sep + tpl.roles[1] + ": "
    cursor = 1
    labels[:cursor] = [IGNORE_INDEX] * cursor
    for round_text in text.split(tpl.sep2):
        if round_text == "":
            break
        parts = round_text.split(answer_sep)
        if len(parts) != 2:
            break
        round_len = count(round_text)
        # "- 2": the BOS of the separate encoding and the piece that "ASSISTANT: " shares with the answer.
        instruction_len = count(parts[0] + answer_sep) - 2
        labels[cursor:cursor + instruction_len] = [IGNORE_INDEX] * max(instruction_len, 0)
        cursor += round_len
    labels[cursor:] = [IGNORE_INDEX] * max(len(labels) - cursor, 0)
    mismatch = cursor != len(input_ids)
    if mismatch:
        labels = [IGNORE_INDEX] * len(input_ids)
    labels = [IGNORE_INDEX if token == image_token_id else label for token, label in zip(input_ids, labels)]

    truncated = len(input_ids) > max_length
    image_dropped = has_image and image_token_id not in input_ids[:max_length]
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return EncodedSample(*expand_image(input_ids, labels, image_token_id, num_image_tokens), mismatch, truncated,
                         image_dropped)


def expand_image(input_ids: list[int], labels: list[int], image_token_id: int,
                 num_image_tokens: int) -> tuple[list[int], list[int]]:
    """Replace each single image placeholder by ``num_image_tokens`` copies (labels masked there)."""
    out_ids: list[int] = []
    out_labels: list[int] = []
    for token, label in zip(input_ids, labels):
        if token == image_token_id:
            out_ids.extend([image_token_id] * num_image_tokens)
            out_labels.extend([IGNORE_INDEX] * num_image_tokens)
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels
