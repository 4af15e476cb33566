"""Forced-choice (likelihood) scoring of closed-set answers, and teacher-forced answer-token distributions.

Greedy generation turns a model's belief into one string, so a question answered right with probability 0.45 and
one answered right with 0.05 both count as wrong; with a closed answer set (scene class, Yes/No, a count,
rural/urban) the model's choice can instead be read off directly: the candidate whose full answer, ending with
``</s>``, has the highest log-likelihood under the evaluation prompt,

    choice = argmax_c  sum_{t in answer(c) + </s>} log p(y_t | prompt, y_<t).

The sum (not the per-token mean) is the probability of the whole answer as a complete reply, the quantity a
closed-set decision needs; the closing ``</s>`` keeps a candidate that is a prefix of another ("dense" vs "dense
residential") from winning by stopping early. Ties go to the first candidate in the given order.

Sequences are tokenized exactly as training tokenizes an answer (``prompts.encode_conversation`` with the
evaluation template): the labelled positions are the answer tokens and ``</s>``. Each (question, candidate) pair
is one row of a right-padded batch; only the labelled positions go through the LM head, so the (B, L, V) logits
of a real 32k vocabulary are never formed. (A shared-prefix KV cache would save the repeated prompt, but at the
sizes this runs at the batch is already cheap, and one plain forward is the easiest thing to check against
transformers.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kd_pipeline.prompts import IGNORE_INDEX, IMAGE_TOKEN, encode_conversation

EVAL_TEMPLATE = "llava_v1"
PAD_ID = 0


@dataclass(frozen=True)
class AnswerSequence:
    input_ids: list[int]  # (L,) prompt + answer + </s>, the image expanded to its placeholder ids
    labels: list[int]     # (L,) the token at answer positions, IGNORE_INDEX elsewhere


def answer_sequence(question: str, answer: str, tokenizer, image_token_id: int, num_image_tokens: int,
                    template: str = EVAL_TEMPLATE) -> AnswerSequence:
    """The evaluation prompt for ``question`` (one image) followed by ``answer`` and ``</s>``, labelled as in
    training. Raises ValueError when GeoChat's label bookkeeping disagrees with the tokens (a "mismatch")."""
    conversation = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": answer}]
    sample = encode_conversation(conversation, tokenizer, image_token_id=image_token_id,
                                 num_image_tokens=num_image_tokens, template=template, max_length=1 << 30)
    if sample.mismatch or all(label == IGNORE_INDEX for label in sample.labels):
        raise ValueError(f"answer {answer!r} to {question!r} does not tokenize into a labelled answer")
    return AnswerSequence(sample.input_ids, sample.labels)


def right_pad(sequences: Sequence[AnswerSequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (B, L), padded on the right."""
    length = max(len(sequence.input_ids) for sequence in sequences)
    input_ids = torch.full((len(sequences), length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        size = len(sequence.input_ids)
        input_ids[row, :size] = torch.tensor(sequence.input_ids)
        attention_mask[row, :size] = 1
        labels[row, :size] = torch.tensor(sequence.labels)
    return input_ids, attention_mask, labels


@torch.inference_mode()
def answer_token_logits(model, sequences: Sequence[AnswerSequence], pixel_values: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced logits at every labelled position of a batch of sequences (one image per sequence).

    ``model`` is a transformers ``LlavaForConditionalGeneration``; ``pixel_values`` (B, 3, S, S).
    Returns (logits (N, V) float32 in row-major order of the labelled positions, targets (N,), row (N,))."""
    device = pixel_values.device
    input_ids, attention_mask, labels = (tensor.to(device) for tensor in right_pad(sequences))
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                         use_cache=False).last_hidden_state  # (B, L, H)
    targets = labels[:, 1:]  # (B, L-1): position i predicts token i+1
    labelled = targets != IGNORE_INDEX  # (B, L-1)
    logits = model.lm_head(hidden[:, :-1][labelled]).float()  # (N, V)
    rows = torch.arange(len(sequences), device=device)[:, None].expand_as(targets)[labelled]  # (N,)
    return logits, targets[labelled], rows


def sequence_logprobs(model, sequences: Sequence[AnswerSequence], pixel_values: torch.Tensor) -> torch.Tensor:
    """log p(answer + </s> | prompt) per sequence, (B,) float32."""
    logits, targets, rows = answer_token_logits(model, sequences, pixel_values)
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    return torch.zeros(len(sequences), device=logits.device).index_add_(0, rows, token_logprobs)


@dataclass(frozen=True)
class Choice:
    answer: str                  # the chosen candidate
    logprobs: dict[str, float]   # every candidate's log-likelihood


def forced_choice(eval_model, questions: Sequence[str], pixel_values: torch.Tensor,
                  candidates: Sequence[Sequence[str]], batch_rows: int = 64) -> list[Choice]:
    """The highest-likelihood candidate for each question (module doc), ``pixel_values`` (Q, 3, S, S)."""
    if len(questions) != pixel_values.shape[0] or len(questions) != len(candidates):
        raise ValueError(f"{len(questions)} questions, {pixel_values.shape[0]} images, {len(candidates)} candidate "
                         "lists: give one of each per question")
    pairs = [(index, candidate) for index, options in enumerate(candidates) for candidate in options]
    sequences = [answer_sequence(questions[index], candidate, eval_model.tokenizer, eval_model.image_token_id,
                                 eval_model.num_image_tokens) for index, candidate in pairs]
    scores: list[float] = []
    for start in range(0, len(pairs), batch_rows):
        chunk = slice(start, start + batch_rows)
        image_index = torch.tensor([index for index, _ in pairs[chunk]])
        images = pixel_values[image_index].to(eval_model.device, eval_model.dtype)  # (b, 3, S, S)
        scores.extend(sequence_logprobs(eval_model.model, sequences[chunk], images).tolist())
    choices, cursor = [], 0
    for options in candidates:
        logprobs = dict(zip(options, scores[cursor:cursor + len(options)]))
        cursor += len(options)
        best = max(options, key=lambda option: (logprobs[option], -options.index(option)))
        choices.append(Choice(best, logprobs))
    return choices
