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
evaluation template): the labelled positions are the answer tokens and ``</s>``. Each question's prompt is
run once (with its image) and its KV cache is repeated for each of its candidates, whose few tokens then run on
top (``prefix_cached_logprobs``): 10 scene classes cost one prompt forward plus 10 x 3 tokens, not 10 prompt
forwards. ``answer_token_logits`` (teacher-forced full sequences, used by ``eval.agreement``) sends only the
labelled positions through the LM head, so the (B, L, V) logits of a real 32k vocabulary are never formed.
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


@dataclass(frozen=True)
class Choice:
    answer: str                  # the chosen candidate
    logprobs: dict[str, float]   # every candidate's log-likelihood


def candidate_tokens(question: str, candidate: str, prompt_ids: list[int], tokenizer, image_token_id: int,
                     num_image_tokens: int) -> list[int]:
    """The answer tokens (+ ``</s>``) of ``candidate`` as training tokenizes them; they must follow the evaluation
    prompt's own tokens unchanged (checked), so the prompt can be run once for every candidate."""
    sequence = answer_sequence(question, candidate, tokenizer, image_token_id, num_image_tokens)
    start = next(index for index, label in enumerate(sequence.labels) if label != IGNORE_INDEX)
    if sequence.input_ids[:start] != prompt_ids:
        raise ValueError(f"the prompt of {question!r} tokenizes differently once {candidate!r} follows it")
    return sequence.input_ids[start:]


@torch.inference_mode()
def prefix_cached_logprobs(model, prompt_ids: list[list[int]], pixel_values: torch.Tensor,
                           answers: list[list[list[int]]]) -> list[list[float]]:
    """log p(answer | prompt) for every candidate of every prompt, running each prompt (and its image) once.

    The prompts are left-padded with positions counted over real tokens (as ``generate`` does); their KV cache is
    repeated once per candidate (``Cache.batch_select_indices``) and the right-padded candidate tokens run on top.
    ``pixel_values`` (Q, 3, S, S) on the model's device; ``answers[q]`` is the token list of each candidate of q."""
    from kd_pipeline.eval.generate import left_pad

    device = pixel_values.device
    input_ids, attention_mask = (tensor.to(device) for tensor in left_pad(prompt_ids))  # (Q, P)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (Q, P)
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   pixel_values=pixel_values, use_cache=True, logits_to_keep=1)
    first_logprobs = torch.log_softmax(output.logits[:, -1].float(), dim=-1)  # (Q, V): predicts answer token 0
    rows = [(question, tokens) for question, options in enumerate(answers) for tokens in options]
    cache = output.past_key_values
    cache.batch_select_indices(torch.tensor([question for question, _ in rows], device=device))
    length = max(len(tokens) for _, tokens in rows)
    candidate_ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long, device=device)  # (R, A)
    candidate_mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
    for row, (_, tokens) in enumerate(rows):
        candidate_ids[row, :len(tokens)] = torch.tensor(tokens, device=device)
        candidate_mask[row, :len(tokens)] = 1
    prompt_rows = torch.tensor([question for question, _ in rows], device=device)
    start = attention_mask.sum(-1)[prompt_rows]  # (R,) real prompt length = first answer position
    logits = model(input_ids=candidate_ids, past_key_values=cache, use_cache=True,
                   attention_mask=torch.cat([attention_mask[prompt_rows], candidate_mask], dim=1),
                   position_ids=start[:, None] + torch.arange(length, device=device)[None]).logits  # (R, A, V)
    later = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, candidate_ids[:, 1:, None]).squeeze(-1)
    first = first_logprobs[prompt_rows].gather(-1, candidate_ids[:, :1]).squeeze(-1)  # (R,)
    totals = (first + (later * candidate_mask[:, 1:]).sum(-1)).tolist()  # (R,)
    scores, cursor = [], 0
    for options in answers:
        scores.append(totals[cursor:cursor + len(options)])
        cursor += len(options)
    return scores


def forced_choice(eval_model, questions: Sequence[str], pixel_values: torch.Tensor,
                  candidates: Sequence[Sequence[str]], batch_questions: int = 16) -> list[Choice]:
    """The highest-likelihood candidate for each question (module doc), ``pixel_values`` (Q, 3, S, S)."""
    from kd_pipeline.eval.generate import encode_question

    if len(questions) != pixel_values.shape[0] or len(questions) != len(candidates):
        raise ValueError(f"{len(questions)} questions, {pixel_values.shape[0]} images, {len(candidates)} candidate "
                         "lists: give one of each per question")
    # Tokenizing is a third of the time when every question carries the same prompt (scene classification): each
    # distinct prompt and (prompt, candidate) pair is tokenized once per call.
    prompt_cache: dict[str, list[int]] = {}
    answer_cache: dict[tuple[str, str], list[int]] = {}

    def prompt_of(question: str) -> list[int]:
        if question not in prompt_cache:
            prompt_cache[question] = encode_question(question, eval_model.tokenizer, eval_model.image_token_id,
                                                     eval_model.num_image_tokens)
        return prompt_cache[question]

    def answer_of(question: str, option: str) -> list[int]:
        if (question, option) not in answer_cache:
            answer_cache[question, option] = candidate_tokens(question, option, prompt_of(question),
                                                              eval_model.tokenizer, eval_model.image_token_id,
                                                              eval_model.num_image_tokens)
        return answer_cache[question, option]

    choices = []
    for start in range(0, len(questions), batch_questions):
        chunk = slice(start, start + batch_questions)
        prompts = [prompt_of(question) for question in questions[chunk]]
        answers = [[answer_of(question, option) for option in options]
                   for question, options in zip(questions[chunk], candidates[chunk])]
        images = pixel_values[chunk].to(eval_model.device, eval_model.dtype)
        for options, scores in zip(candidates[chunk], prefix_cached_logprobs(eval_model.model, prompts, images,
                                                                            answers)):
            logprobs = dict(zip(options, scores))
            best = max(range(len(options)), key=lambda index: (scores[index], -index))
            choices.append(Choice(options[best], logprobs))
    return choices
