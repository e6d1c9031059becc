"""Few-shot metrics: CIDEr-D (COCO captioning) and VQA accuracy (VQAv2), pure Python.

CIDEr-D follows the COCO caption evaluation code (coco-caption / pycocoevalcap `Cider`):
n-grams n=1..4, TF-IDF vectors with document frequencies from the references of the whole
evaluated set (idf = log(#images) - log(max(1, df))), per-n cosine similarity with clipping
(min(hyp, ref) * ref), a Gaussian length penalty exp(-(l_hyp - l_ref)^2 / (2 * 6^2)), mean
over n, mean over references, x10, mean over images. Its quirk is kept: the "length" of a
sentence is its number of bigrams. pycocoevalcap tokenizes with Stanford's PTBTokenizer (Java);
`ptb_tokenize` approximates it in Python (lower-case, contractions split, punctuation tokens
dropped); tests check the scorer against pycocoevalcap on pre-tokenized text.

VQA accuracy is the official VQA evaluation (vqaEval.py, GT-Vision-Lab/VQA): per question,
the average over the 10 leave-one-out subsets of the human answers of
min(#matches in the subset / 3, 1). Normalisation (punctuation, number words -> digits,
articles removed, contractions restored, lower-case) is applied as the official script does:
only when the human answers are not all identical (they are compared lower-cased always).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Mapping, Sequence

# -- VQA ----------------------------------------------------------------------------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
         "`", ",", "?", "!"]
# The official patterns, verbatim: "(?!<=\d)" is a (harmless) typo for a lookbehind, so the
# period rule removes every "." not followed by a digit; the official call passes re.UNICODE
# (32) as `count`, i.e. at most 32 periods are removed.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The official answer normalisation (punctuation, then digits/articles/contractions)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one prediction against the human answers (VQAv2: 10)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    res = prediction.replace("\n", " ").replace("\t", " ").strip()
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        res = process_digit_article(process_punctuation(res))
    res = res.lower()
    matches = [a.lower() == res for a in gts]
    total = sum(matches)
    # Leave answer i out: matches among the others (answers are distinct records).
    accs = [min(1.0, (total - matches[i]) / 3.0) for i in range(len(gts))]
    return sum(accs) / len(accs)


def vqa_score(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean VQA accuracy in percent (as the VQA leaderboards report it)."""
    if len(predictions) != len(answers):
        raise ValueError("predictions and answers differ in length")
    if not predictions:
        return 0.0
    return 100.0 * sum(vqa_accuracy(p, a) for p, a in zip(predictions, answers)) / len(answers)


# -- multiple choice and yes / no (zero-shot instruction benchmarks, `mm1-eval --chat`) -----

_LETTER_ALONE = re.compile(r"^\(?([A-Z])\)?(?:[.):]|$)")  # "B", "B.", "(B)", "B) red", "B: red"
_LETTER_SAID = re.compile(r"\b(?:answer|option) is:? \(?([A-Z])\b")  # "The answer is B"


def choice_letter(prediction: str, options: Sequence[str]) -> str | None:
    """The option a free-form answer picks (ScienceQA / MMBench style, as LLaVA's evaluation
    reads them): a letter on its own or with punctuation ("B", "(B)", "B. red"), or "the
    answer is B"; else the one option whose text the answer is or contains (case-insensitive);
    None when it names none or several ("A cat" is not option A)."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    text = prediction.strip()
    for pattern in (_LETTER_ALONE, _LETTER_SAID):
        match = pattern.search(text)
        if match and match.group(1) in letters:
            return match.group(1)
    lowered = text.lower().rstrip(".")
    named = [letter for letter, option in zip(letters, options)
             if re.search(rf"\b{re.escape(option.lower())}\b", lowered)]
    return named[0] if len(named) == 1 else None


def yes_no(prediction: str) -> str | None:
    """POPE's rule: "yes" / "no" from the answer's first word (", no punctuation"); None
    otherwise (POPE counts an unparsable answer as "no"; we report it as such)."""
    words = re.findall(r"[a-z]+", prediction.lower())
    if not words:
        return None
    return words[0] if words[0] in ("yes", "no") else ("no" if "no" in words[:3] or "not" in
                                                        words[:3] else None)


def yes_no_scores(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of "yes" (the positive class), the share of "yes"
    answers; an unparsable prediction counts as "no" (POPE's evaluation)."""
    if len(predictions) != len(answers):
        raise ValueError("predictions and answers differ in length")
    said = [yes_no(p) == "yes" for p in predictions]
    truth = [a.strip().lower() == "yes" for a in answers]
    tp = sum(s and t for s, t in zip(said, truth))
    fp = sum(s and not t for s, t in zip(said, truth))
    fn = sum(t and not s for s, t in zip(said, truth))
    n = len(truth)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": 100.0 * sum(s == t for s, t in zip(said, truth)) / n if n else 0.0,
            "precision": 100.0 * precision, "recall": 100.0 * recall,
            "f1": 100.0 * (2 * precision * recall / (precision + recall)
                           if precision + recall else 0.0),
            "yes_ratio": 100.0 * sum(said) / n if n else 0.0}


# -- CIDEr-D ------------------------------------------------------------------------------

# Tokens coco-caption's PTBTokenizer drops after tokenizing (brackets come out as -LRB- etc.).
_PTB_DROP = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";",
                       "(", ")", "[", "]", "{", "}", '"'})
_CONTRACTION = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\.\.\.|--|\w+(?:[-.,'&/]\w+)*|\S")


def ptb_tokenize(text: str) -> list[str]:
    """Approximates coco-caption's PTB tokenization: lower-case, "don't" -> do n't,
    "cat's" -> cat 's, punctuation split off and dropped, hyphenated words and numbers kept."""
    text = text.lower().replace("\n", " ")
    text = re.sub(r"(?i)(\w)n't\b", r"\1 n't", text)
    text = _CONTRACTION.sub(r"\1 \2", text)
    return [t for t in _TOKEN.findall(text) if t not in _PTB_DROP]


def _ngrams(words: Sequence[str], n: int) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def cider_d(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]],
            n: int = 4, sigma: float = 6.0, tokenize: bool = True) -> tuple[float, dict]:
    """(corpus CIDEr-D, {id: per-image score}) for one hypothesis per image id and its
    reference captions. Document frequencies come from the references of these images.
    `tokenize=False`: text is already tokenized (split on whitespace), as pycocoevalcap's
    `Cider.compute_score` expects."""
    ids = list(hypotheses)
    if set(ids) != set(references):
        raise ValueError("hypotheses and references must have the same image ids")
    if not ids:
        return 0.0, {}
    split = ptb_tokenize if tokenize else str.split
    tests = [_ngrams(split(hypotheses[i]), n) for i in ids]
    refs = [[_ngrams(split(r), n) for r in references[i]] for i in ids]
    if any(not r for r in refs):
        raise ValueError("every image needs at least one reference caption")
    df: defaultdict = defaultdict(float)
    for image_refs in refs:
        for gram in {g for r in image_refs for g in r}:
            df[gram] += 1
    log_images = math.log(float(len(ids)))

    def vectorize(counts: Counter):
        vec = [dict() for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = float(tf) * (log_images - math.log(max(1.0, df[gram])))
            norm[k] += vec[k][gram] ** 2
            if k == 1:  # coco-caption's length: the number of bigrams
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def similarity(hyp, ref) -> list[float]:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
        out = []
        for k in range(n):
            val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
            if nh[k] != 0 and nr[k] != 0:
                val /= nh[k] * nr[k]
            out.append(val * penalty)
        return out

    scores = {}
    for image_id, test, image_refs in zip(ids, tests, refs):
        hyp = vectorize(test)
        total = [0.0] * n
        for r in image_refs:
            total = [a + b for a, b in zip(total, similarity(hyp, vectorize(r)))]
        scores[image_id] = sum(total) / n / len(image_refs) * 10.0
    return sum(scores.values()) / len(scores), scores
