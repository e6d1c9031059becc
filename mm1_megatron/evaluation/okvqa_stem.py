"""OK-VQA's answer stemming, applied to predictions before the VQA accuracy.

OK-VQA v1.1's annotations hold each human answer twice: `raw_answer` as typed and `answer`
stemmed ("riding horses" -> "ride horse"); the accuracy compares against the stemmed ones, so
an unstemmed prediction ("horses") can miss a matching answer. open_flamingo's OK-VQA
evaluation stems predictions word by word: a table of words whose OK-VQA stem its rules get
wrong (found by comparing the two fields of the released annotations), else a word ending in
"ing" becomes its verb lemma (WordNet), else a plural noun (NLTK's tagger: NNS / NNPS) is
singularised (`inflection.singularize`).

Here the table is learned the same way, from the annotations the user holds (`learn_stems`:
every (raw_answer, answer) pair of the training split with as many words on both sides, each
word's most frequent stem; words the stemming leaves alone are kept too, so a rule cannot
change them), and the rules run on lemminflect's English lexicon (verb lemmas; a word is a
plural noun when its noun lemma differs from it), which ships its data in the wheel: NLTK's
tagger and WordNet are downloads, and nothing is downloaded at run time. For isolated words
the lexicon and the tagger agree; in a multi-word answer the tagger also reads context, which
this does not.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable


def learn_stems(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """word -> its OK-VQA stem, from (raw_answer, answer) pairs; each word's most frequent
    stem (ties: the first seen). Pairs whose word counts differ are skipped."""
    seen: dict[str, Counter] = defaultdict(Counter)
    for raw, stemmed in pairs:
        words, stems = raw.lower().split(), stemmed.lower().split()
        if len(words) == len(stems):
            for word, stem in zip(words, stems):
                seen[word][stem] += 1
    return {word: counts.most_common(1)[0][0] for word, counts in seen.items()}


def stem_word(word: str, stems: dict[str, str]) -> str:
    from lemminflect import getAllLemmas, getLemma
    import inflection

    if word in stems:
        return stems[word]
    if word.endswith("ing"):
        # WordNet's lemmatizer leaves a word it does not know as it is: no guessing here.
        lemmas = getLemma(word, upos="VERB", lemmatize_oov=False)
        return lemmas[0] if lemmas else word
    nouns = getAllLemmas(word, upos="NOUN").get("NOUN", ())
    if any(lemma != word for lemma in nouns):  # a plural noun
        return inflection.singularize(word)
    return word


def okvqa_stem(text: str, stems: dict[str, str]) -> str:
    """`text` with each word stemmed as OK-VQA v1.1 stemmed its answers."""
    return " ".join(stem_word(word, stems) for word in text.lower().split())
