"""Golden prompt strings (from GeoChat's conversation.py, separator style TWO) and preprocess_v1 label masks."""

import pytest
import sentencepiece as spm
from transformers.utils.chat_template_utils import render_jinja_template

from kd_pipeline.prompts import (IGNORE_INDEX, chat_template, encode_conversation, render, render_eval_prompt,
                                 tokenize_with_image)
from kd_pipeline.tokenizer import image_token_id

VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
LLAVA = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
         "detailed, and polite answers to the human's questions.")

CONVERSATION = [
    {"from": "human", "value": "What is in the picture?\n<image>"},
    {"from": "gpt", "value": "A red ship near the harbour."},
    {"from": "human", "value": "[refer] Give me the location of <p> the plane </p>"},
    {"from": "gpt", "value": "{<10><20><30><40>|<45>}"},
]


def test_vicuna_multi_turn_with_image_golden():
    assert render(CONVERSATION, "vicuna_v1") == (
        VICUNA + " USER: <image>\nWhat is in the picture? ASSISTANT: A red ship near the harbour.</s>"
        "USER: [refer] Give me the location of <p> the plane </p> ASSISTANT: {<10><20><30><40>|<45>}</s>")


def test_vicuna_text_only_golden():
    text_only = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                 {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye."}]
    assert render(text_only, "vicuna_v1") == VICUNA + " USER: Hi ASSISTANT: Hello.</s>USER: Bye ASSISTANT: Bye.</s>"


def test_llava_eval_prompts_golden():
    assert render_eval_prompt("[refer] Give me the location of <p> X </p>") == (
        LLAVA + " USER: <image>\n[refer] Give me the location of <p> X </p> ASSISTANT:")
    assert render_eval_prompt("Hi", has_image=False) == LLAVA + " USER: Hi ASSISTANT:"
    multi = CONVERSATION[:3]
    assert render(multi, "llava_v1", open_answer=True) == (
        LLAVA + " USER: <image>\nWhat is in the picture? ASSISTANT: A red ship near the harbour.</s>"
        "USER: [refer] Give me the location of <p> the plane </p> ASSISTANT:")


def test_image_token_moved_to_front_from_anywhere():
    turn = [{"from": "human", "value": "Look <image> here"}, {"from": "gpt", "value": "ok"}]
    assert render(turn).startswith(VICUNA + " USER: <image>\nLook  here ASSISTANT: ok</s>")


def test_tokenizer_matches_sentencepiece_legacy(tokenizer, tokenizer_dir):
    """transformers' tokenizer must encode like GeoChat's slow legacy LLaMA tokenizer: each stretch between
    special tokens gets SentencePiece's dummy prefix."""
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    text = render(CONVERSATION).split("<image>")[1]
    expected = [1]
    for index, part in enumerate(text.split("</s>")):
        if index:
            expected.append(2)
        if part:
            expected.extend(processor.encode(part))
    assert tokenizer(text).input_ids == expected


def _supervised_text(sample, tokenizer):
    return tokenizer.decode([t for t, l in zip(sample.input_ids, sample.labels) if l != IGNORE_INDEX])


def test_labels_supervise_exactly_answers_and_eos(tokenizer):
    image_id = image_token_id(tokenizer)
    sample = encode_conversation(CONVERSATION, tokenizer, image_token_id=image_id, num_image_tokens=9)
    assert not sample.mismatch and not sample.truncated
    assert len(sample.input_ids) == len(sample.labels)
    # Image block: 9 contiguous placeholder ids after the system prompt and "USER:", all masked.
    start = sample.input_ids.index(image_id)
    assert sample.input_ids[0] == 1 and sample.input_ids[start:start + 9] == [image_id] * 9
    assert sample.input_ids.count(image_id) == 9
    assert all(label == IGNORE_INDEX for label in sample.labels[:start + 9])
    supervised = [i for i, l in enumerate(sample.labels) if l != IGNORE_INDEX]
    # Two answers, each ending with </s>, and the last supervised token is the final </s>.
    assert [sample.input_ids[i] for i in supervised].count(2) == 2
    assert supervised[-1] == len(sample.input_ids) - 1 and sample.input_ids[-1] == 2
    decoded = _supervised_text(sample, tokenizer).replace(" ", "")
    assert decoded == "Aredshipneartheharbour.</s>{<10><20><30><40>|<45>}</s>"
    # Independent check: the unsupervised tokens decode to the prompt side only.
    masked = tokenizer.decode([t for t, l in zip(sample.input_ids, sample.labels) if l == IGNORE_INDEX and t != image_id])
    assert "ASSISTANT:" in masked and "harbour" not in masked


def test_text_only_labels(tokenizer):
    conv = [{"from": "human", "value": "Is there a ship?"}, {"from": "gpt", "value": "yes"}]
    sample = encode_conversation(conv, tokenizer, image_token_id=image_token_id(tokenizer), num_image_tokens=9)
    assert not sample.mismatch
    assert _supervised_text(sample, tokenizer).replace(" ", "") == "yes</s>"
    assert image_token_id(tokenizer) not in sample.input_ids


def test_truncation_keeps_image_block_whole(tokenizer):
    image_id = image_token_id(tokenizer)
    full = encode_conversation(CONVERSATION, tokenizer, image_token_id=image_id, num_image_tokens=9)
    start = full.input_ids.index(image_id)
    max_length = start + 4  # the placeholder and 3 text tokens after it survive the cut
    sample = encode_conversation(CONVERSATION, tokenizer, image_token_id=image_id, num_image_tokens=9,
                                 max_length=max_length)
    assert sample.truncated and not sample.image_dropped
    assert len(sample.input_ids) == max_length - 1 + 9
    assert sample.input_ids[start:start + 9] == [image_id] * 9
    assert sample.input_ids[:start + 9] == full.input_ids[:start + 9]
    cut = encode_conversation(CONVERSATION, tokenizer, image_token_id=image_id, num_image_tokens=9, max_length=start)
    assert cut.image_dropped and image_id not in cut.input_ids


def test_mismatch_is_reported_and_masked(tokenizer):
    """A turn that itself contains the separator breaks GeoChat's bookkeeping: flagged, not hidden."""
    conv = [{"from": "human", "value": "Say </s> please"}, {"from": "gpt", "value": "no"}]
    sample = encode_conversation(conv, tokenizer, image_token_id=image_token_id(tokenizer), num_image_tokens=4)
    assert sample.mismatch
    assert all(label == IGNORE_INDEX for label in sample.labels)


def test_tokenize_with_image_single_placeholder(tokenizer):
    image_id = image_token_id(tokenizer)
    ids = tokenize_with_image("USER: <image>\nHi ASSISTANT:", tokenizer, image_id)
    assert ids[0] == 1 and ids.count(image_id) == 1 and ids.count(1) == 1


def apply_template(messages: list[dict], template: str, *, add_generation_prompt: bool = False) -> str:
    """transformers' own Jinja rendering (what ``apply_chat_template`` runs) of ``chat_template(template)``."""
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=chat_template(template),
                                        add_generation_prompt=add_generation_prompt)
    return rendered[0]


def test_chat_templates_render_the_golden_prompts():
    """The exported chat templates give the golden strings above, for image items and for string contents."""
    as_items = [{"role": "user", "content": [{"type": "text", "text": "What is in the picture?"}, {"type": "image"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A red ship near the harbour."}]},
                {"role": "user", "content": "[refer] Give me the location of <p> the plane </p>"},
                {"role": "assistant", "content": "{<10><20><30><40>|<45>}"}]
    as_strings = [{"role": "user" if turn["from"] == "human" else "assistant", "content": turn["value"]}
                  for turn in CONVERSATION]
    for messages in (as_items, as_strings):
        assert apply_template(messages, "vicuna_v1") == render(CONVERSATION, "vicuna_v1")
        assert apply_template(messages[:3], "llava_v1", add_generation_prompt=True) == (
            LLAVA + " USER: <image>\nWhat is in the picture? ASSISTANT: A red ship near the harbour.</s>"
            "USER: [refer] Give me the location of <p> the plane </p> ASSISTANT:")
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Classify."}]}]
    assert apply_template(question, "llava_v1", add_generation_prompt=True) == render_eval_prompt("Classify.")
    system = [{"role": "system", "content": "Be brief."}, *question]
    assert apply_template(system, "llava_v1", add_generation_prompt=True) == (
        "Be brief. USER: <image>\nClassify. ASSISTANT:")


def test_chat_template_refuses_a_second_image():
    later_image = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                   {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]
    with pytest.raises(Exception, match="one image, in the first user turn"):
        apply_template(later_image, "llava_v1")
