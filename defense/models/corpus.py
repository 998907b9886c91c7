"""Text for tiny language models: a seeded synthetic corpus and a local-file reader.

The synthetic corpus is built for CPU runs of a few minutes. It has a small vocabulary and real
structure, so a tiny model quickly gets well below the unigram perplexity and has peaked
next-token distributions (which the logprob defenses and the distillation attacks need):

- facts about a fixed "world": every person has one city, job, pet and food, every city one
  country; the same fact is stated the same way in every document that mentions it;
- arithmetic and comparisons ("3 plus 4 is 7.", "9 is more than 2.");
- counting runs ("Counting from 5: 5, 6, 7, 8.");
- questions followed by their answer ("Where does Bravik live? Bravik lives in Tolmen.").

The world depends only on ``world_seed``; ``seed`` picks which documents are drawn. Two calls
with different ``seed`` and the same ``world_seed`` are train and held-out splits of one
distribution.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["read_text_files", "synthetic_corpus"]

_ONSETS = ("b", "br", "d", "dr", "f", "g", "k", "l", "m", "n", "p", "r", "s", "st", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea")
_CODAS = ("", "", "n", "l", "r", "k", "s", "m", "th")

# fmt: off
_JOBS = (
    "baker", "farmer", "teacher", "doctor", "painter", "sailor", "miner", "singer", "tailor", "cook",
    "driver", "writer", "builder", "hunter", "weaver", "guard", "nurse", "pilot", "judge", "potter",
)
_ANIMALS = (
    "cat", "dog", "horse", "goat", "bird", "fish", "rabbit", "mouse", "duck", "sheep",
    "frog", "fox", "owl", "pig", "cow", "bee", "snake", "turtle", "lizard", "crab",
)
_COLORS = ("red", "blue", "green", "black", "white", "brown", "gray", "yellow", "orange", "pink", "purple", "gold")
_FOODS = (
    "bread", "apples", "rice", "soup", "cheese", "fish", "beans", "honey", "plums", "eggs",
    "pears", "nuts", "corn", "cake", "tea", "milk", "grapes", "carrots", "onions", "figs",
)
# fmt: on

_N_PEOPLE = 120  # enough names that a 2-minute model cannot memorize every fact: facts stay uncertain
_N_CITIES = 40
_N_COUNTRIES = 10
_MAX_NUMBER = 20  # operands 0..20: a few hundred distinct sums, learnable in minutes


@dataclass(frozen=True)
class _Person:
    name: str
    city: str
    job: str
    pet_color: str
    pet: str
    food: str


@dataclass(frozen=True)
class _World:
    people: tuple[_Person, ...]
    country_of: dict[str, str]


def _make_names(rng: random.Random, n: int, *, syllables: tuple[int, int]) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        count = rng.randint(*syllables)
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(count))
        names.add(word.capitalize())
    # sorted before shuffling: set order is not stable across processes (hash randomization)
    ordered = sorted(names)
    rng.shuffle(ordered)
    return ordered


def _make_world(world_seed: int) -> _World:
    rng = random.Random(world_seed)
    words = _make_names(rng, _N_PEOPLE + _N_CITIES + _N_COUNTRIES, syllables=(2, 3))
    people_names = words[:_N_PEOPLE]
    cities = words[_N_PEOPLE : _N_PEOPLE + _N_CITIES]
    countries = words[_N_PEOPLE + _N_CITIES :]
    country_of = {city: rng.choice(countries) for city in cities}
    people = tuple(
        _Person(
            name=name,
            city=rng.choice(cities),
            job=rng.choice(_JOBS),
            pet_color=rng.choice(_COLORS),
            pet=rng.choice(_ANIMALS),
            food=rng.choice(_FOODS),
        )
        for name in people_names
    )
    return _World(people=people, country_of=country_of)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _person_sentences(p: _Person, country_of: dict[str, str]) -> list[str]:
    return [
        f"{p.name} lives in {p.city}.",
        f"{p.name} is {_article(p.job)} {p.job}.",
        f"{p.name} has {_article(p.pet_color)} {p.pet_color} {p.pet}.",
        f"{p.name} likes {p.food}.",
        f"{p.city} is in {country_of[p.city]}.",
        f"Where does {p.name} live? {p.name} lives in {p.city}.",
        f"What does {p.name} do? {p.name} is {_article(p.job)} {p.job}.",
        f"The {p.pet} of {p.name} is {p.pet_color}.",
    ]


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, _MAX_NUMBER), rng.randint(0, _MAX_NUMBER)
    kind = rng.randrange(4)
    if kind == 0:
        return f"{a} plus {b} is {a + b}."
    if kind == 1:
        hi, lo = max(a, b), min(a, b)
        return f"{hi} minus {lo} is {hi - lo}."
    if kind == 2:
        a, b = a % 10, b % 10  # times tables up to 9: products stay small and learnable
        return f"{a} times {b} is {a * b}."
    if a == b:
        return f"{a} is equal to {b}."
    return f"{a} is more than {b}." if a > b else f"{a} is less than {b}."


def _counting(rng: random.Random) -> str:
    start = rng.randint(0, 2 * _MAX_NUMBER)
    length = rng.randint(3, 8)
    run = ", ".join(str(start + i) for i in range(length))
    return f"Counting from {start}: {run}."


def _document(rng: random.Random, world: _World) -> str:
    people = rng.sample(world.people, rng.randint(1, 2))
    sentences: list[str] = []
    for _ in range(rng.randint(3, 8)):
        roll = rng.random()
        if roll < 0.55:
            sentences.append(rng.choice(_person_sentences(rng.choice(people), world.country_of)))
        elif roll < 0.8:
            sentences.append(_arithmetic(rng))
        else:
            sentences.append(_counting(rng))
    return " ".join(sentences)


def synthetic_corpus(n_docs: int, *, seed: int = 0, world_seed: int = 0) -> list[str]:
    """Return ``n_docs`` documents drawn with ``random.Random(seed)`` from the world of ``world_seed``.

    Deterministic across processes and platforms. Use a different ``seed`` (same ``world_seed``)
    for held-out text from the same distribution.
    """
    if n_docs < 0:
        raise ValueError(f"n_docs must be >= 0, got {n_docs}")
    world = _make_world(world_seed)
    rng = random.Random(seed)
    return [_document(rng, world) for _ in range(n_docs)]


_TEXT_SUFFIXES = (".txt", ".md", ".rst")


def read_text_files(
    paths: Iterable[str | Path] | str | Path,
    *,
    suffixes: tuple[str, ...] = _TEXT_SUFFIXES,
    encoding: str = "utf-8",
) -> list[str]:
    """Read local text files, one document per file; empty files are skipped.

    A directory is searched recursively for files ending in ``suffixes``, in sorted order, so the
    result does not depend on the file system's listing order. Undecodable bytes are replaced
    rather than failing a long run on one bad file.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"text path does not exist: {path}")
    texts = [f.read_text(encoding=encoding, errors="replace") for f in files]
    return [t for t in texts if t.strip()]
