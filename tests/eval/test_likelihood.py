"""Forced-choice scoring against a brute-force computation with transformers' own forward, one sequence at a time."""

from __future__ import annotations

import pytest
import torch

from kd_pipeline.config import ModelConfig
from kd_pipeline.eval.generate import EvalModel, encode_question
from kd_pipeline.eval.likelihood import answer_sequence, forced_choice
from kd_pipeline.models import build_model, num_image_tokens
from kd_pipeline.prompts import expand_image, render_eval_prompt, tokenize_with_image
from kd_pipeline.tokenizer import image_token_id

QUESTIONS = ["Classify the image. Answer in one word or a short phrase.",
             "Is there a ship in the image?\nAnswer the question using a single word or phrase.",
             "How many planes are there?"]
CANDIDATES = [["forest", "lake", "desert", "farmland", "airport"], ["Yes", "No"], ["0", "1", "2", "3", "12"]]


@pytest.fixture(scope="module")
def eval_model(tokenizer) -> EvalModel:
    torch.manual_seed(3)
    config = ModelConfig(attn_implementation="eager")
    model = build_model(config, vocab_size=len(tokenizer), image_token_id=image_token_id(tokenizer)).eval()
    return EvalModel(model=model, tokenizer=tokenizer, image_token_id=image_token_id(tokenizer),
                     num_image_tokens=num_image_tokens(config), image_size=config.image_size,
                     device=torch.device("cpu"), dtype=torch.float32)


def brute_force_logprob(eval_model: EvalModel, question: str, answer: str, pixel_values: torch.Tensor) -> float:
    """Tokenize prompt and prompt + answer + </s> as plain text, take the answer as what follows the prompt, and
    sum fp64 log-softmax of transformers' full logits over those positions."""
    tokenizer, image_id = eval_model.tokenizer, eval_model.image_token_id
    prompt_ids = encode_question(question, tokenizer, image_id, eval_model.num_image_tokens)
    text = render_eval_prompt(question) + " " + answer + "</s>"
    full_ids, _ = expand_image(*(2 * [tokenize_with_image(text, tokenizer, image_id)]), image_id,
                               eval_model.num_image_tokens)
    assert full_ids[:len(prompt_ids)] == prompt_ids and full_ids[-1] == tokenizer.eos_token_id
    with torch.no_grad():
        logits = eval_model.model(input_ids=torch.tensor([full_ids]), pixel_values=pixel_values[None]).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)  # (L, V)
    return sum(float(logprobs[position - 1, full_ids[position]]) for position in range(len(prompt_ids), len(full_ids)))


def test_forced_choice_equals_brute_force_and_picks_the_argmax(eval_model):
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(len(QUESTIONS), 3, eval_model.image_size, eval_model.image_size, generator=generator)
    choices = forced_choice(eval_model, QUESTIONS, pixel_values, CANDIDATES, batch_questions=2)  # 2 chunks
    for question, options, image, choice in zip(QUESTIONS, CANDIDATES, pixel_values, choices):
        expected = {option: brute_force_logprob(eval_model, question, option, image) for option in options}
        assert choice.logprobs == pytest.approx(expected, abs=2e-4)
        assert choice.answer == max(expected, key=expected.get)


def test_labelled_positions_are_the_answer_and_eos(eval_model):
    sequence = answer_sequence(QUESTIONS[0], "dense residential", eval_model.tokenizer, eval_model.image_token_id,
                               eval_model.num_image_tokens)
    labelled = [token for token in sequence.labels if token != -100]
    expected = eval_model.tokenizer(" dense residential", add_special_tokens=False).input_ids
    assert eval_model.tokenizer.decode(labelled[:-1]).strip() == "dense residential"
    assert labelled[-1] == eval_model.tokenizer.eos_token_id and len(labelled) >= len(expected)


def test_ties_go_to_the_first_candidate_and_bad_shapes_are_refused(eval_model):
    pixel_values = torch.zeros(1, 3, eval_model.image_size, eval_model.image_size)
    choice = forced_choice(eval_model, [QUESTIONS[1]], pixel_values, [["Yes", "Yes"]])[0]
    assert choice.answer == "Yes"
    with pytest.raises(ValueError, match="one of each per question"):
        forced_choice(eval_model, QUESTIONS, pixel_values, CANDIDATES)
