"""Scene graphs of prompts for the semantic filter of active prompt selection.

UniFL (section "active prompt selection") parses each prompt into a scene graph
and drops prompts whose richest entity has fewer than `tau1` attributes and
relations: such prompts ("a cat", "sunset") give the aesthetic reward models
little to learn from. The paper does not name its parser; statistical parsers
(spaCy, Stanford) need downloaded models, which this project cannot assume.
`RuleBasedSceneGraphParser` therefore needs nothing but word lists, and sits
behind the `SceneGraphParser` protocol so a better parser can replace it.

How the rule-based parser reads a prompt:

* It lower-cases, splits into clauses at punctuation (``, ; : . ! ? ( ) [ ] |``)
  and into words.
* Multi-word relations are matched first ("in front of", "next to",
  "left of", ...), then every word gets a role: determiner, numeral,
  relation (prepositions and relational verbs such as "wearing", "holding"),
  conjunction, copula, adverb, verb form or content word.
* A noun phrase is a run of content words; its last word is the entity and
  the words before it (and numerals) are the entity's attributes:
  "a small red circle" -> circle {small, red}.
* A relation word links the latest entity to the next one:
  "a circle above a square" -> (circle, above, square). A verb form just before
  a preposition joins it ("sitting on"). A relation at the start of a clause
  takes the latest entity of an earlier clause as subject.
* "and" between adjectives stays inside the phrase ("black and white cat");
  otherwise it starts a new phrase that shares the latest relation's subject:
  "a circle above a square and a triangle" relates the circle to both, and
  "a circle left of a square and next to a triangle" makes the circle the
  subject of "next to" (the toy captions' grammar). Without an earlier
  relation ("an apple and a pear") the new phrase is unrelated.
* After a copula, a phrase of adjectives describes the latest entity
  ("the sky is blue" -> sky {blue}); a verb form with no object does too
  ("a woman smiling" -> woman {smiling}).

Known limits (documented, tested where they matter): adjectives and nouns are
told apart only by word lists and suffixes, so noun compounds count their
first nouns as attributes ("city street" -> street {city}); a clause made only
of adjectives ("highly detailed") is treated as a style tag, not an entity;
possessives, relative clauses and coordination of whole phrases are not
understood; only English is handled. None of this changes the ranking of the
prompts the filter is for: captions with described, related objects score
high, bare nouns and tag lists score low.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Entity:
    """An object of the scene with the words that describe it."""

    name: str
    attributes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Relation:
    """A directed relation between two entities, by index into `SceneGraph.entities`."""

    subject: int
    predicate: str
    object: int


@dataclass(frozen=True)
class SceneGraph:
    """Entities with attributes, and relations between them."""

    entities: tuple[Entity, ...] = ()
    relations: tuple[Relation, ...] = ()

    def entity_scores(self) -> list[int]:
        """Attributes plus relations involving each entity (as subject or object)."""
        scores = [len(entity.attributes) for entity in self.entities]
        for relation in self.relations:
            scores[relation.subject] += 1
            if relation.object != relation.subject:
                scores[relation.object] += 1
        return scores

    def score(self) -> int:
        """The semantic-filter score: the largest entity score, 0 without entities."""
        return max(self.entity_scores(), default=0)


@runtime_checkable
class SceneGraphParser(Protocol):
    """Anything that turns a prompt into a `SceneGraph`."""

    def parse(self, prompt: str) -> SceneGraph: ...


def _word_set(words: str) -> frozenset[str]:
    return frozenset(words.split())


DETERMINERS = _word_set(
    "a an the this that these those some any each every another other such no "
    "its his her their our my your several many few much more most all both "
    "there here"
)
NUMERALS = _word_set(
    "one two three four five six seven eight nine ten eleven twelve "
    "dozen dozens hundred hundreds thousand thousands pair couple"
)
COPULAS = _word_set("is are was were be been being am looks look seems seem")
CONJUNCTIONS = frozenset(["and", "or", "&", "nor", "but", "plus", "while"])
INTENSIFIERS = _word_set(
    "very really extremely quite too so rather slightly super ultra incredibly"
)
# Prepositions relate the latest entity to the next one. "of" is a relation
# ("a portrait of a woman"), as in common scene-graph conventions.
PREPOSITIONS = _word_set(
    """
    above below under over beneath underneath beside behind near on in at inside
    outside within into onto upon against along across around between among amid
    through toward towards beyond by from with without of off past via atop
    """
)
# Relational verbs relate the clause's first entity (its subject) to the next one:
# in "a man in a red hat holding a cup" the man holds the cup, not the hat.
RELATIONAL_VERBS = _word_set(
    """
    wearing holding riding carrying eating drinking playing reading watching using
    hugging chasing pulling pushing throwing catching kicking feeding walking
    facing touching grabbing petting kissing wielding driving flying climbing
    containing covering surrounding overlooking
    """
)
RELATION_WORDS = PREPOSITIONS | RELATIONAL_VERBS
# Multi-word relations, matched before single words (longest first).
RELATION_PHRASES: tuple[tuple[str, ...], ...] = tuple(
    sorted(
        (
            tuple(phrase.split())
            for phrase in (
                "left of",
                "right of",
                "to the left of",
                "to the right of",
                "on the left of",
                "on the right of",
                "next to",
                "close to",
                "in front of",
                "in the middle of",
                "on top of",
                "at the top of",
                "at the bottom of",
                "in the back of",
                "on the side of",
                "out of",
                "instead of",
                "far from",
                "away from",
                "made of",
                "full of",
                "filled with",
                "covered in",
                "covered with",
                "surrounded by",
                "dressed in",
                "looking at",
                "sitting on",
                "standing on",
                "lying on",
            )
        ),
        key=len,
        reverse=True,
    )
)
# Nouns ending in -ing/-ed: neither verb forms nor adjectives.
NOUNS_LIKE_VERB_FORMS = _word_set(
    """
    painting paintings building buildings drawing drawings ceiling clothing evening
    morning ring rings king kings wing wings string strings thing things spring
    swing wedding lightning sibling pudding stocking stockings icing frosting
    landing lighting earring earrings sling sting darling bed beds sled shed seed
    seeds seaweed bread head heads forehead bird birds hundred
    """
)
ADJECTIVES = _word_set(
    """
    red green blue yellow orange purple pink brown black white gray grey golden
    silver dark bright pale vivid colorful colourful small large big tiny
    huge giant little tall short long wide narrow thick thin round flat
    old young new ancient modern beautiful pretty ugly cute happy sad angry
    calm quiet loud soft hard smooth rough wet dry hot cold warm cool fresh
    clean dirty empty full rich poor high low deep shallow heavy strong weak
    fast slow early late striped noisy dotted spotted shiny glossy matte
    sunny cloudy rainy snowy foggy misty stormy windy dusty rusty wooden
    metallic fluffy furry hairy fancy elegant simple complex
    realistic surreal abstract cinematic dramatic epic majestic mysterious
    magical futuristic vintage retro gothic neon pastel detailed
    intricate ornate lush vibrant gloomy moody serene peaceful
    cozy cosy bold crisp sharp blurry hazy glowing sparkling sacred naked
    wicked rugged beloved crooked jagged ragged tired curved lovely ugly curly
    """
)
ADJECTIVE_SUFFIXES = ("ful", "ous", "ive", "ic", "less", "ish", "able", "ible", "ed", "est")

_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*|&")
# Resolution and camera tags ("8k", "1080p", "35mm") are style tags, never entities.
_TECHNICAL_TAG = re.compile(r"\d+(?:k|p|mm|fps|px|hd)?")
_CLAUSE_BREAK = re.compile(r"[,;:.!?()\[\]{}|\n\t\"]+")


def looks_like_adjective(word: str) -> bool:
    """Heuristic: a known adjective or an adjective suffix (not on the noun list)."""
    if word in ADJECTIVES:
        return True
    if word in NOUNS_LIKE_VERB_FORMS or len(word) <= 4:
        return False
    return word.endswith(ADJECTIVE_SUFFIXES)


def _is_numeral(word: str) -> bool:
    return word in NUMERALS or word.isdigit()


_PHRASES_BY_FIRST_WORD: dict[str, list[tuple[str, ...]]] = {}
for _phrase in RELATION_PHRASES:
    _PHRASES_BY_FIRST_WORD.setdefault(_phrase[0], []).append(_phrase)


def _match_phrase(words: list[str], start: int) -> tuple[str, ...] | None:
    for phrase in _PHRASES_BY_FIRST_WORD.get(words[start], ()):
        if tuple(words[start : start + len(phrase)]) == phrase:
            return phrase
    return None


@dataclass
class _ParseState:
    entities: list[Entity] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)
    phrase: list[str] = field(default_factory=list)
    numerals: list[str] = field(default_factory=list)
    predicate: list[str] = field(default_factory=list)
    subject: int | None = None
    after_copula: bool = False
    determined: bool = False
    clause_start: int = 0
    last_relation: tuple[int, str] | None = None
    previous_clause_subject: int | None = None
    coordinated: tuple[int, str] | None = None

    def describe_latest(self, words: list[str]) -> None:
        if self.entities and words:
            latest = self.entities[-1]
            self.entities[-1] = Entity(latest.name, latest.attributes + tuple(words))

    def close_phrase(self) -> None:
        """Turn the pending phrase into an entity and attach a pending relation."""
        words, numerals, determined = self.phrase, self.numerals, self.determined
        self.phrase, self.numerals, self.determined = [], [], False
        if not words:
            return
        head = words[-1]
        if not determined and all(looks_like_adjective(word) for word in words):
            # Adjectives without a determiner describe the latest entity after a
            # copula ("the sky is blue"); elsewhere they are a style tag
            # ("highly detailed"). With a determiner the last word is a noun ("a light").
            if self.after_copula:
                self.describe_latest(numerals + words)
            self.after_copula = False
            return
        self.entities.append(Entity(head, tuple(numerals + words[:-1])))
        index = len(self.entities) - 1
        if self.predicate and self.subject is not None:
            self.relations.append(Relation(self.subject, " ".join(self.predicate), index))
            self.last_relation = (self.subject, " ".join(self.predicate))
        elif self.coordinated is not None:
            # "X above Y and Z": X is above Z too (the toy captions' grammar).
            subject, predicate = self.coordinated
            self.relations.append(Relation(subject, predicate, index))
        self.predicate, self.subject, self.after_copula = [], None, False
        self.coordinated = None

    def start_relation(self, words: list[str], verb: bool) -> None:
        self.close_phrase()
        if self.predicate:
            self.predicate.extend(words)
        elif self.entities:
            self.predicate = list(words)
            has_clause_subject = self.clause_start < len(self.entities)
            if self.coordinated is not None:
                # "X left of Y and next to Z": the coordinated relation is X's.
                self.subject = self.coordinated[0]
            elif verb and has_clause_subject:
                self.subject = self.clause_start
            elif verb and self.previous_clause_subject is not None:
                # ", standing in front of ..." continues the previous clause's subject.
                self.subject = self.previous_clause_subject
            else:
                self.subject = len(self.entities) - 1
        self.coordinated = None

    def end_clause(self) -> None:
        self.close_phrase()
        # A verb without an object describes its subject ("a woman smiling").
        verbs = [word for word in self.predicate if word not in RELATION_WORDS]
        if self.subject is not None and verbs and len(verbs) == len(self.predicate):
            entity = self.entities[self.subject]
            self.entities[self.subject] = Entity(entity.name, entity.attributes + tuple(verbs))
        self.predicate, self.subject, self.after_copula = [], None, False
        if self.clause_start < len(self.entities):
            self.previous_clause_subject = self.clause_start
        self.clause_start = len(self.entities)
        self.last_relation = self.coordinated = None


class RuleBasedSceneGraphParser:
    """A scene-graph parser from word lists and suffix rules; see the module docstring."""

    def parse(self, prompt: str) -> SceneGraph:
        state = _ParseState()
        for clause in _CLAUSE_BREAK.split(prompt.lower()):
            words = _WORD.findall(clause)
            self._parse_clause(words, state)
            state.end_clause()
        return SceneGraph(tuple(state.entities), tuple(state.relations))

    def _is_verb_form(self, words: list[str], index: int, state: _ParseState) -> bool:
        word = words[index]
        if len(word) <= 4 or not word.endswith(("ing", "ed")) or word in NOUNS_LIKE_VERB_FORMS:
            return False
        if word in ADJECTIVES:
            return False
        following = words[index + 1] if index + 1 < len(words) else None
        if following is None:
            return bool(state.phrase) and not looks_like_adjective(state.phrase[-1])
        if (
            following in DETERMINERS
            or following in RELATION_WORDS
            or _is_numeral(following)
            or _match_phrase(words, index + 1) is not None
        ):
            return True
        return bool(state.phrase) and not looks_like_adjective(state.phrase[-1])

    def _parse_clause(self, words: list[str], state: _ParseState) -> None:
        index = 0
        while index < len(words):
            word = words[index]
            phrase = _match_phrase(words, index)
            if phrase is not None:
                state.start_relation(list(phrase), verb=phrase[0].endswith(("ing", "ed")))
                index += len(phrase)
                continue
            following = words[index + 1] if index + 1 < len(words) else ""
            if word in DETERMINERS:
                state.close_phrase()
                state.determined = True
            elif _is_numeral(word):
                if state.phrase:
                    state.close_phrase()
                state.numerals.append(word)
                state.determined = True
            elif word in COPULAS:
                state.close_phrase()
                state.after_copula = True
            elif word in CONJUNCTIONS:
                joins_adjectives = (
                    bool(state.phrase)
                    and looks_like_adjective(state.phrase[-1])
                    and following not in DETERMINERS
                    and not _is_numeral(following)
                    and following not in RELATION_WORDS
                )
                if not joins_adjectives:
                    state.close_phrase()
                    state.predicate, state.subject = [], None
                    state.coordinated = state.last_relation
            elif word in INTENSIFIERS or (word.endswith("ly") and looks_like_adjective(following)):
                pass  # adverbs qualify the next word ("highly detailed"); not attributes
            elif word in PREPOSITIONS:
                state.start_relation([word], verb=False)
            elif word in RELATIONAL_VERBS or self._is_verb_form(words, index, state):
                state.start_relation([word], verb=True)
            elif _TECHNICAL_TAG.fullmatch(word) and not state.phrase:
                pass
            else:
                state.phrase.append(word)
            index += 1


def semantic_scores(prompts: list[str], parser: SceneGraphParser | None = None) -> list[int]:
    """The semantic-filter score of every prompt (see `SceneGraph.score`)."""
    parser = parser or RuleBasedSceneGraphParser()
    return [parser.parse(prompt).score() for prompt in prompts]
