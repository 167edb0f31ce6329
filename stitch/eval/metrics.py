"""Official benchmark metrics, re-implemented from each benchmark's own definition.

Every function here scores one prediction (or, for CIDEr, one corpus) and is pure: no I/O, no model. They are
written from the benchmarks' published evaluation code so that a Stitch number can be put beside a number in a
paper. Where the official code has a step that is not a measurement (MMMU's parser picks a *random* option when
it cannot read the answer; MathVista asks GPT-4 to extract the answer), Stitch does not follow it: an answer
that cannot be read is wrong, and the caller counts it as "unparsable" so the reader sees how often it happens.

Conventions: scores are floats in [0, 1] per sample (the caller averages them); an empty prediction is wrong
for every metric.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence

from stitch.errors import StitchError

# ---------------------------------------------------------------------------------------------------------
# VQA accuracy (VQAv2, TextVQA): the VQA evaluation's answer normalisation and the 10-human consensus score.
# ---------------------------------------------------------------------------------------------------------

# The VQA evaluation's contraction table (keys are the forms without an apostrophe). Some keys start with a
# capital letter and so never match after lower-casing; that is how the official table behaves, kept as is.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
              "?", "!"]  # fmt: skip
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern is written "(?!<=\d)(\.)(?!\d)": its first group is a look-*ahead* for the text "<=d",
# which never blocks, so in effect it removes every period not followed by a digit ("3.5" keeps its period,
# "yes." and "u.s." lose theirs). Kept byte-for-byte in behaviour.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def _vqa_punctuation(text: str) -> str:
    """The VQA eval's `processPunctuation`: a mark touching a space (or any text holding "digit,digit") is
    deleted; a mark inside a word becomes a space ("black-and-white" -> "black and white")."""
    out = text
    delete = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _VQA_PUNCT:
        if delete or (p + " " in text or " " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _vqa_digits_articles(text: str) -> str:
    """The VQA eval's `processDigitArticle`: lower-case, number words to digits, drop articles, restore
    apostrophes in common contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """Normalise an answer the way the VQA challenge's (EvalAI) answer processor does.

    Lower-case; drop "," and "?" and split "'s" off its word; newlines and tabs to spaces; then the VQA eval's
    punctuation rule, number words to digits ("two" -> "2", "none" -> "0"), articles removed and contractions
    given their apostrophe. The same function is applied to the prediction and to every human answer, as
    TextVQA's official evaluator does (VQAv2's human answers are already in this form, so for VQAv2 it changes
    nothing on their side).
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: min(#humans who gave the answer / 3, 1), averaged over the 10 leave-one-out subsets.

    For each human answer in turn, that answer is held out and the prediction scores
    min(1, matches among the other nine / 3); the ten results are averaged. With 10 answers this gives
    0.3, 0.6, 0.9, 1.0 for 1, 2, 3, 4+ matching humans. An empty prediction scores 0.
    """
    pred = normalize_vqa_answer(prediction)
    if not pred or not answers:
        return 0.0
    refs = [normalize_vqa_answer(a) for a in answers]
    if len(refs) == 1:  # leave-one-out is undefined for one answer: plain agreement instead
        return float(pred == refs[0])
    matches = sum(r == pred for r in refs)
    total = 0.0
    for r in refs:
        others = matches - (r == pred)
        total += min(1.0, others / 3.0)
    return total / len(refs)


# ---------------------------------------------------------------------------------------------------------
# ANLS (DocVQA, InfographicVQA)
# ---------------------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _anls_normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity for one question (DocVQA's definition).

    Both sides are lower-cased with whitespace collapsed; the similarity to an answer is
    1 - edit_distance / max(len(answer), len(prediction)); the question scores the best similarity over its
    answers, or 0 when that is below `threshold` (0.5: a similarity of exactly 0.5 is kept, as in the
    official scoring script). An empty prediction scores 0.
    """
    pred = _anls_normalize(prediction)
    if not pred or not answers:
        return 0.0
    best = 0.0
    for answer in answers:
        ref = _anls_normalize(answer)
        length = max(len(ref), len(pred))
        best = max(best, 1.0 - levenshtein(ref, pred) / length)
    return best if best >= threshold else 0.0


# ---------------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# ---------------------------------------------------------------------------------------------------------

_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d*)?$")


def _chart_numbers(text: str) -> list[float]:
    """The values a ChartQA answer can stand for: [] when it is not a number.

    "12" -> [12]; "-3.5" -> [-3.5]; "1,234" -> [1234]; "45%" -> [0.45, 45] (ChartQA's definition reads a
    percentage as a fraction, while chart labels usually print the bare number, so either is accepted).
    """
    s = text.strip().replace("\u2212", "-")  # the Unicode minus sign
    percent = s.endswith("%")
    if percent:
        s = s[:-1].strip()
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    try:
        value = float(s)
    except ValueError:
        return []
    if not math.isfinite(value):
        return []
    return [value / 100.0, value] if percent else [value]


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy: a numeric answer is right within `tolerance` (5%) relative error of the
    target; any other answer needs an exact (case-insensitive) match.

    Negative numbers compare by magnitude of the difference (|pred - target| / |target|), so the sign must be
    right. A target of 0 cannot take a relative tolerance, so the prediction must equal 0 exactly. Surrounding
    whitespace is ignored; an empty prediction scores 0.
    """
    pred, tgt = prediction.strip(), target.strip()
    if not pred:
        return 0.0
    pred_values, tgt_values = _chart_numbers(pred), _chart_numbers(tgt)
    if pred_values and tgt_values:
        for t in tgt_values:
            for p in pred_values:
                if t == 0.0:
                    if p == 0.0:
                        return 1.0
                elif abs(p - t) / abs(t) <= tolerance:
                    return 1.0
        return 0.0
    return float(pred.lower() == tgt.lower())


# ---------------------------------------------------------------------------------------------------------
# Multiple choice: MMMU's rule-based parser (without its random fallback), MMMU open questions
# ---------------------------------------------------------------------------------------------------------


def choice_letters(n: int) -> list[str]:
    """Option letters for `n` choices: A, B, C, ..."""
    if n > 26:
        raise StitchError(f"{n} answer choices: at most 26 (A-Z) are supported")
    return [chr(ord("A") + i) for i in range(n)]


def parse_multi_choice_response(response: str, choices: Sequence[str] | Mapping[str, str]) -> str | None:
    """The option letter a free-form response picks, by MMMU's rule-based parser; None when none can be read.

    `choices` is the list of option texts (lettered A, B, ...) or a mapping letter -> text. In order:
    1. a bracketed letter "(B)" anywhere;
    2. a bare letter standing alone between spaces (" B "), after stripping ,.!?;:' from both ends;
    3. only for responses longer than five words, the text of an option appearing in the response;
    when several candidates are found the one mentioned last wins. MMMU then picks a random option if nothing
    matched; Stitch returns None instead so that the answer counts as wrong and is reported as unparsable.
    """
    index2ans = dict(choices) if isinstance(choices, Mapping) else dict(zip(choice_letters(len(choices)), choices))
    letters = list(index2ans)
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = f" {response} "  # so that " A " also matches at either end

    candidates = [c for c in letters if f"({c})" in response]
    bracketed = bool(candidates)
    by_text = False
    if not candidates:
        candidates = [c for c in letters if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, text in index2ans.items() if str(text).lower() in response.lower()]
        by_text = bool(candidates)
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]

    def position(c: str) -> int:
        if by_text:
            return response.lower().rfind(str(index2ans[c]).lower())
        return response.rfind(f"({c})" if bracketed else f" {c} ")

    # The last mentioned wins; ties (equal positions) go to the earlier letter, as numpy's argmax does.
    return max(candidates, key=lambda c: (position(c), -letters.index(c)))


def multiple_choice_accuracy(prediction: str, answer: str, choices: Sequence[str]) -> tuple[float, str | None]:
    """Score a multiple-choice prediction: (1.0 or 0.0, the letter parsed or None when unparsable).

    `answer` is the correct letter ("B"); `choices` are the option texts in letter order.
    """
    letter = parse_multi_choice_response(prediction, choices) if prediction.strip() else None
    return float(letter is not None and letter == answer.strip().upper()), letter


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def _normalize_open(text: str | float) -> list[str | float]:
    """MMMU's `normalize_str`: numbers become floats rounded to 2 places; other text is lower-cased, and a
    one-character text is padded with a space on either side so that it cannot match inside a word."""
    if isinstance(text, (int, float)):
        return [round(float(text), 2)]
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    if len(text) == 1:
        return [" " + text, text + " "]
    return [text]


def extract_numbers(text: str) -> list[str]:
    """All numbers written in `text` (MMMU's patterns): "1,234", "-5", "3.5", "1e-3"."""
    with_commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text)
    return with_commas + scientific + simple


def parse_open_response(response: str) -> list[str | float]:
    """MMMU's parser for open (short-answer) questions: the candidate answers a response states.

    The response is split into sentences; in each, the text after the last key phrase ("is", "so",
    "therefore", "answer", "final", "result", "could be", and "=" in the last sentence) is a candidate, as are
    all numbers in those candidates; numbers are normalised to floats (2 decimals), text is lower-cased.
    """
    text = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", text)
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    keys: list[str] = []
    for i, sentence in enumerate(sentences):
        marks = indicators + (["="] if i == len(sentences) - 1 else [])
        shortest: str | None = None
        for mark in marks:
            if mark in sentence:
                tail = sentence.split(mark)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", "'"]:
            keys.append(shortest)
    if not keys:
        keys = [text]
    candidates: list[str | float] = list(keys)
    for key in keys:
        candidates.extend(extract_numbers(key))
    normalized: list[str | float] = []
    for c in candidates:
        normalized.extend(_normalize_open(c))
    return list(dict.fromkeys(normalized))  # dedupe, keep order


def open_answer_correct(answers: Sequence[str] | str, candidates: Sequence[str | float]) -> bool:
    """MMMU's `eval_open`: right when a numeric candidate equals a numeric answer (2 decimals) or an answer's
    text appears inside a text candidate."""
    golds: list[str | float] = []
    for a in [answers] if isinstance(answers, str) else answers:
        golds.extend(_normalize_open(a))
    for cand in candidates:
        if isinstance(cand, str):
            if any(isinstance(g, str) and g in cand for g in golds):
                return True
        elif cand in golds:
            return True
    return False


# ---------------------------------------------------------------------------------------------------------
# MathVista (rule-based answer extraction; no GPT)
# ---------------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d*\.\d+|-?\d+")


def _last_number(text: str) -> float | None:
    """The number an answer states: the whole text when it is a number, else the last number written in it
    (direct answers put the value at the end: "... so the answer is 12.")."""
    s = text.strip().replace("\u2212", "-").rstrip(".")
    try:
        return float(s.replace(",", ""))
    except ValueError:
        pass
    found = _NUMBER.findall(s)
    if not found:
        return None
    return float(found[-1].replace(",", ""))


def mathvista_extract(
    response: str,
    question_type: str,
    answer_type: str,
    choices: Sequence[str] | None = None,
    precision: int | None = None,
) -> str | None:
    """Read MathVista's answer out of a response by rules, normalised as MathVista's scorer compares it;
    None when nothing can be read.

    multi_choice: the option text (the response may be the text itself, a letter "B", "(B)", or a longer
    sentence naming one option, read with MMMU's parser); integer: str(int(value)); float: the value rounded
    to `precision` decimals; list: the bracketed list with spaces removed. MathVista's own pipeline asks GPT-4
    to extract the answer and, failing that, picks the most similar option; Stitch does neither.
    """
    text = response.strip()
    if not text:
        return None
    if question_type == "multi_choice":
        options = [str(c) for c in choices or []]
        if text in options:
            return text
        letter = parse_multi_choice_response(text, options)
        return options[ord(letter) - ord("A")] if letter else None
    if answer_type == "integer":
        value = _last_number(text)
        return None if value is None else str(int(value))
    if answer_type == "float":
        value = _last_number(text)
        return None if value is None else str(round(value, int(precision or 0)))
    if answer_type == "list":
        found = re.findall(r"\[[^\[\]]*\]", text)
        return re.sub(r"\s+", "", found[-1]) if found else re.sub(r"\s+", "", text)
    return text


def mathvista_correct(extracted: str | None, answer: str, answer_type: str) -> bool:
    """MathVista's `safe_equal` on normalised strings (lists compared without spaces)."""
    if extracted is None:
        return False
    if answer_type == "list":
        return extracted == re.sub(r"\s+", "", str(answer))
    return extracted == str(answer).strip()


# ---------------------------------------------------------------------------------------------------------
# OCRBench
# ---------------------------------------------------------------------------------------------------------

OCRBENCH_CATEGORIES = [
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
    "Scene Text-centric VQA",
    "Doc-oriented VQA",
    "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
]
# The first six make OCRBench's "Text Recognition" line.
OCRBENCH_TEXT_RECOGNITION = OCRBENCH_CATEGORIES[:6]


def ocrbench_match(prediction: str, answers: Sequence[str] | str, dataset_name: str = "") -> float:
    """OCRBench's rule: right when any answer appears as a substring of the prediction.

    For handwritten maths (dataset HME100k) all spaces are removed from both sides and case is kept (LaTeX is
    case-sensitive); otherwise both are lower-cased, trimmed and newlines become spaces. An empty prediction
    (or an empty answer, which would match anything) scores 0.
    """
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not prediction.strip():
        return 0.0
    hme = dataset_name == "HME100k"
    for answer in answers:
        if hme:
            a = answer.strip().replace("\n", " ").replace(" ", "")
            p = prediction.strip().replace("\n", " ").replace(" ", "")
        else:
            a = answer.lower().strip().replace("\n", " ")
            p = prediction.lower().strip().replace("\n", " ")
        if a and a in p:
            return 1.0
    return 0.0


# ---------------------------------------------------------------------------------------------------------
# Exact match (easy-vqa, RealWorldQA)
# ---------------------------------------------------------------------------------------------------------


def _exact_normalize(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def exact_match(prediction: str, answers: Sequence[str] | str) -> float:
    """1.0 when the prediction equals an answer, ignoring case, surrounding space and a final period."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    pred = _exact_normalize(prediction)
    return float(bool(pred) and any(pred == _exact_normalize(a) for a in answers))


# ---------------------------------------------------------------------------------------------------------
# CIDEr (COCO captions) through pycocoevalcap
# ---------------------------------------------------------------------------------------------------------

# What the official PTB tokenizer step removes after tokenising.
_PTB_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
              "...", ";"}  # fmt: skip


_BRACKETS = {"(", ")", "[", "]", "{", "}", '"'}
_CLITICS = {"'s", "'re", "'ve", "'ll", "'d", "'m", "n't"}


def simple_caption_tokenize(text: str) -> str:
    """A pure-Python stand-in for the Stanford PTB tokenizer used by the COCO caption evaluation (which needs
    Java): lower-case, split punctuation and clitics off words, drop the punctuation the official step drops."""
    text = text.lower().replace("\n", " ")
    text = re.sub(r"([.,!?;:()\[\]{}\"`]|--|\.\.\.)", r" \1 ", text)
    text = re.sub(r"(\w)('s|'re|'ve|'ll|'d|'m|n't)\b", r"\1 \2", text)
    tokens = []
    for t in text.split():
        if t not in _CLITICS:
            t = t.strip("'")  # quotes around a word are punctuation; the clitics keep theirs
        if t and t not in _PTB_PUNCT and t not in _BRACKETS:
            tokens.append(t)
    return " ".join(tokens)


def _writable_package_dir() -> bool:
    """The PTB wrapper writes its temporary file beside its own module, so the folder must be writable."""
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    return os.access(os.path.dirname(os.path.abspath(ptb.__file__)), os.W_OK)


def cider(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], tokenizer: str = "auto"
) -> tuple[float, dict[str, float], str]:
    """CIDEr-D over a corpus with pycocoevalcap's scorer: (corpus score, per-image scores, tokenizer used).

    Every image of `references` is scored; one without a prediction (or with an empty one) scores 0 but its
    references still count towards the IDF, as they would in the official evaluation. Scores are on
    pycocoevalcap's scale (a perfect match of a 4+ word caption scores 10; papers print 100x the corpus
    mean). IDF comes from the references of the images scored, so a score depends on the whole set: compare
    models on the same images. `tokenizer`: "ptb" (the official Stanford PTB tokenizer; needs `java`),
    "simple" (pure Python, close to PTB) or "auto" (PTB when Java is found).
    """
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:
        raise StitchError(
            "CIDEr needs pycocoevalcap: pip install pycocoevalcap (or pip install 'stitch-vlm[eval]')"
        ) from e
    ids = list(references)
    if not ids:
        return 0.0, {}, tokenizer
    answered = [i for i in ids if (predictions.get(i) or "").strip()]
    if tokenizer == "auto":
        tokenizer = "ptb" if shutil.which("java") and _writable_package_dir() else "simple"
    if tokenizer == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        ptb = PTBTokenizer()
        try:
            gts = ptb.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
            res = ptb.tokenize({i: [{"caption": predictions[i]}] for i in answered}) if answered else {}
        except OSError as e:  # no java, or pycocoevalcap's folder not writable for its temporary file
            raise StitchError(f"the PTB tokenizer (java) failed: {e}; use the 'simple' tokenizer") from e
    elif tokenizer == "simple":
        gts = {i: [simple_caption_tokenize(c) for c in references[i]] for i in ids}
        res = {i: [simple_caption_tokenize(predictions[i])] for i in answered}
    else:
        raise StitchError(f"unknown caption tokenizer {tokenizer!r}: use auto, ptb or simple")
    # The PTB step is fed only non-empty captions (it drops empty lines, which would misalign the rest).
    res = {i: res.get(i, [""]) for i in ids}
    score, per_image = Cider().compute_score(gts, res)
    return float(score), {i: float(s) for i, s in zip(ids, per_image)}, tokenizer


__all__ = [
    "OCRBENCH_CATEGORIES",
    "OCRBENCH_TEXT_RECOGNITION",
    "anls",
    "choice_letters",
    "cider",
    "exact_match",
    "extract_numbers",
    "levenshtein",
    "mathvista_correct",
    "mathvista_extract",
    "multiple_choice_accuracy",
    "normalize_vqa_answer",
    "ocrbench_match",
    "open_answer_correct",
    "parse_multi_choice_response",
    "parse_open_response",
    "relaxed_accuracy",
    "simple_caption_tokenize",
    "vqa_accuracy",
]
