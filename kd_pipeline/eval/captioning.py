"""Region captioning scores (GeoChat-Bench region_captioning.jsonl; paper Table 7): ROUGE-1, ROUGE-L, METEOR.

Text preparation: tags such as `<p>`, `</p>`, `<unk>`, `</s>` (a "<", optional "/", letters or underscores, ">")
are removed from answers and references and whitespace is collapsed. The ground truth may be one string or a list
of reference strings.

ROUGE: `rouge-score`'s F-measure per sample (its tokenizer lowercases and drops punctuation; Porter stemming on by
default, reported as `rouge_stemmer`), best over the references, averaged over samples.

METEOR, in order of preference (`meteor_backend`):
1. "meteor-1.5": the standard METEOR 1.5 jar shipped in `pycocoevalcap`, run through that package's wrapper; needs
   `java` on PATH. Its score is corpus-level (the jar aggregates the statistics of all segments), as in COCO.
2. "nltk": `nltk.translate.meteor_score`, the mean of per-sample scores; only when NLTK's WordNet data is already
   installed (it is never downloaded).
3. otherwise `meteor` is None and `meteor_note` says why. No approximation of METEOR is ever substituted.
If the jar fails at run time the next backend is tried and the failure is recorded in `meteor_note`.

Unparsable answers (missing, blank, over-long, or empty once tags are removed) score 0 on every metric and are
counted in `unparsable`. All metrics are fractions in [0, 1].
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rouge_score import rouge_scorer

from kd_pipeline.eval.records import answer_text, split_missing_ground_truth
from kd_pipeline.eval.uncertainty import mean_se

logger = logging.getLogger(__name__)

METEOR_JAR = "meteor-1.5"
METEOR_NLTK = "nltk"
_TAG = re.compile(r"</?[A-Za-z_]+>")
_WHITESPACE = re.compile(r"\s+")
_WORD_OR_PUNCTUATION = re.compile(r"\w+|[^\w\s]")


def strip_tags(text: str) -> str:
    """`text` without tags like <p>, </p>, <unk> and with whitespace collapsed to single spaces."""
    return _WHITESPACE.sub(" ", _TAG.sub(" ", text)).strip()


def references_of(ground_truth: Any) -> list[str]:
    """The non-empty reference strings of a ground truth (a string or a list of strings), tags stripped."""
    candidates = ground_truth if isinstance(ground_truth, (list, tuple)) else [ground_truth]
    return [cleaned for text in candidates if isinstance(text, str) and (cleaned := strip_tags(text))]


def java_path() -> str | None:
    """Path of the `java` executable, or None (split out so tests can simulate machines without Java)."""
    return shutil.which("java")


def meteor_jar_path() -> Path | None:
    """Path of pycocoevalcap's meteor-1.5.jar, or None when the package (or the jar in it) is missing."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    jar = Path(next(iter(spec.submodule_search_locations))) / "meteor" / "meteor-1.5.jar"
    return jar if jar.is_file() else None


def wordnet_available() -> bool:
    """Whether NLTK's WordNet corpus is installed locally (looked up without downloading anything)."""
    try:
        import nltk
    except ImportError:
        return False
    for resource in ("corpora/wordnet.zip", "corpora/wordnet"):
        try:
            nltk.data.find(resource)
            return True
        except LookupError:
            continue
    return False


def meteor_backend() -> tuple[str | None, str]:
    """(backend name or None, explanation) following the preference order of the module docstring."""
    reasons = []
    if java_path() is None:
        reasons.append("METEOR 1.5 needs `java` on PATH (not found)")
    if meteor_jar_path() is None:
        reasons.append("METEOR 1.5 jar not found (pip install pycocoevalcap)")
    if not reasons:
        return METEOR_JAR, "METEOR 1.5 jar from pycocoevalcap"
    if wordnet_available():
        return METEOR_NLTK, "; ".join([*reasons, "using NLTK's METEOR (mean of sentence scores)"])
    reasons.append("NLTK's METEOR needs the WordNet corpus, which is not installed (never downloaded here)")
    return None, "; ".join(reasons)


def meteor_jar_score(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """(corpus METEOR 1.5, per-segment scores) of hypotheses against their references via pycocoevalcap's jar
    wrapper; the segment scores give the standard error.

    The wrapper speaks a line protocol with the jar: newlines and its "|||" separator are removed from the text
    first, and an empty hypothesis is sent as "" (scores 0).
    """
    from pycocoevalcap.meteor.meteor import Meteor

    def one_line(text: str) -> str:
        return _WHITESPACE.sub(" ", text.replace("|||", " ")).strip()

    hypothesis_by_id = {index: [one_line(text)] for index, text in enumerate(hypotheses)}
    references_by_id = {index: [one_line(text) for text in refs] for index, refs in enumerate(references)}
    scorer = Meteor()
    try:
        score, segment_scores = scorer.compute_score(references_by_id, hypothesis_by_id)
    finally:
        # compute_score leaves its lock held when the jar answers garbage or dies, and the wrapper's __del__
        # (which stops the JVM) would then block forever on that lock.
        if scorer.lock.locked():
            scorer.lock.release()
    return float(score), [float(value) for value in segment_scores]


def meteor_nltk_score(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """(mean, per-sample scores) of NLTK's sentence METEOR (lowercased word/punctuation tokens)."""
    from nltk.translate.meteor_score import meteor_score

    def tokens(text: str) -> list[str]:
        return _WORD_OR_PUNCTUATION.findall(text.lower())

    scores = [
        meteor_score([tokens(reference) for reference in refs], tokens(hypothesis)) if hypothesis else 0.0
        for hypothesis, refs in zip(hypotheses, references)
    ]
    return sum(scores) / len(scores), scores


def score_region_captioning(
    records: Iterable[Mapping[str, Any]], use_stemmer: bool = True, meteor: str = "auto"
) -> dict[str, Any]:
    """Score region-captioning answer records; see the module docstring.

    Args:
        use_stemmer: Porter stemming in ROUGE (rouge-score option).
        meteor: "auto" (preference order), or "off" to skip METEOR (reported as None with that reason).

    Raises:
        ValueError: no record has a reference caption, or `meteor` is not "auto"/"off".
    """
    if meteor not in ("auto", "off"):
        raise ValueError(f"meteor must be 'auto' or 'off', got {meteor!r}")
    scored, skipped = split_missing_ground_truth(records, "region_captioning")
    hypotheses: list[str] = []
    references: list[list[str]] = []
    unparsable = 0
    for record in scored:
        refs = references_of(record["ground_truth"])
        if not refs:
            skipped += 1
            continue
        answer = answer_text(record)
        hypothesis = strip_tags(answer) if answer is not None else ""
        unparsable += not hypothesis
        hypotheses.append(hypothesis)
        references.append(refs)
    if not hypotheses:
        raise ValueError("region_captioning: no record has a non-empty reference caption")

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=use_stemmer)
    rouge1_scores, rouge_l_scores = [], []
    for hypothesis, refs in zip(hypotheses, references):
        scores = scorer.score_multi(refs, hypothesis) if hypothesis else None
        rouge1_scores.append(scores["rouge1"].fmeasure if scores else 0.0)
        rouge_l_scores.append(scores["rougeL"].fmeasure if scores else 0.0)

    meteor_value, segment_scores, backend, note = _meteor(hypotheses, references, meteor)
    return {
        "task": "region_captioning",
        "n": len(hypotheses),
        "unparsable": unparsable,
        "skipped_no_ground_truth": skipped,
        "rouge1": sum(rouge1_scores) / len(hypotheses),
        "rouge1_se": mean_se(rouge1_scores),
        "rougeL": sum(rouge_l_scores) / len(hypotheses),
        "rougeL_se": mean_se(rouge_l_scores),
        "rouge_stemmer": use_stemmer,
        "meteor": meteor_value,
        "meteor_se": mean_se(segment_scores) if segment_scores else None,
        "meteor_backend": backend,
        "meteor_note": note,
    }


def _meteor(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], mode: str
) -> tuple[float | None, list[float], str | None, str]:
    """(METEOR, per-segment scores, backend, note); (None, [], None, why) when it cannot be computed."""
    if mode == "off":
        return None, [], None, "METEOR switched off"
    backend, note = meteor_backend()
    if backend == METEOR_JAR:
        try:
            return *meteor_jar_score(hypotheses, references), METEOR_JAR, note
        except (OSError, ValueError, BrokenPipeError) as error:
            note = f"METEOR 1.5 jar failed ({type(error).__name__}: {error})"
            logger.warning("%s", note)
            backend = METEOR_NLTK if wordnet_available() else None
            if backend is None:
                return None, [], None, note + "; NLTK WordNet data not installed"
    if backend == METEOR_NLTK:
        return *meteor_nltk_score(hypotheses, references), METEOR_NLTK, note
    logger.warning("METEOR unavailable: %s", note)
    return None, [], None, note
