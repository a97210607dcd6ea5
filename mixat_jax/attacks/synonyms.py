"""English synonyms for AutoDAN-HGA's word-level step (issue #17; AutoDAN, Liu et al. 2023).

The reference (AutoDAN ``utils/opt_utils.py``, also HarmBench's ``baselines/autodan``) takes
synonyms from NLTK's WordNet: ``{lemma.name() for s in wordnet.synsets(word) for lemma in
s.lemmas()}``, which needs ``nltk.download("wordnet")`` at run time. No package in the PyPI
registry ships WordNet ready to use offline (``wn`` and ``nltk`` download it; ``textblob`` uses
NLTK's download), so this module reads a synonym table derived from WordNet 3.0 and shipped as
package data (``data/wordnet_synonyms.json.gz``; derivation and the WordNet licence in
``data/WORDNET_LICENSE.txt``).

What differs from ``wordnet.synsets(word)`` lemma names:
* only lemmas with tagged senses (SemCor counts > 0: 21,398 common words) have entries; a rarer
  word gets no synonyms (the reference could replace it);
* only single-word synonyms (the reference may insert ``take_in``-style multiword lemmas with
  their underscore);
* inflected forms are reduced with WordNet's morphological detachment rules (NLTK's ``morphy``
  rules) but without its exception lists (``went`` is not reduced to ``go``);
* the word's base forms are part of its synonym list (a synset's lemmas include them, as in
  the reference).

Also the stop words the word step never replaces (NLTK's English list, written out here).
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

__all__ = ["STOP_WORDS", "WORDNET_SYNONYMS_PATH", "wordnet_synonyms"]

WORDNET_SYNONYMS_PATH = Path(__file__).parent / "data" / "wordnet_synonyms.json.gz"

STOP_WORDS: frozenset[str] = frozenset(
    """i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
    yourselves he him his himself she she's her hers herself it it's its itself they them their
    theirs themselves what which who whom this that that'll these those am is are was were be
    been being have has had having do does did doing a an the and but if or because as until
    while of at by for with about against between into through during before after above below
    to from up down in out on off over under again further then once here there when where why
    how all any both each few more most other some such no nor not only own same so than too
    very s t can will just don don't should should've now d ll m o re ve y ain aren aren't
    couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma
    mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren
    weren't won won't wouldn wouldn't""".split()
)

# WordNet's morphy detachment rules (suffix -> replacement), all parts of speech.
_DETACH: tuple[tuple[str, str], ...] = (
    ("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
    ("men", "man"), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""),
    ("ing", "e"), ("ing", ""), ("er", ""), ("est", ""), ("er", "e"), ("est", "e"),
)  # fmt: skip


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, tuple[str, ...]]:
    with gzip.open(WORDNET_SYNONYMS_PATH, "rt", encoding="utf-8") as f:
        return {k: tuple(v) for k, v in json.load(f).items()}


def _base_forms(word: str, table: dict[str, tuple[str, ...]]) -> list[str]:
    forms = [word] if word in table else []
    for suffix, repl in _DETACH:
        if word.endswith(suffix) and len(word) > len(suffix):
            base = word[: -len(suffix)] + repl
            if base in table and base not in forms:
                forms.append(base)
    return forms


@functools.lru_cache(maxsize=65536)
def wordnet_synonyms(word: str) -> list[str]:
    """Synonyms of ``word`` (lower-cased first, as the reference does) with its WordNet base
    forms ("planning" -> "plan", "planning", "preparation", ...); [] for an unknown word.
    Sorted, so draws over them are deterministic."""
    w = word.lower()
    table = _table()
    out: set[str] = set()
    for base in _base_forms(w, table):
        out.update(table[base])
        out.add(base)
    return sorted(out)
