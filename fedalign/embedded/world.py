"""The made-up world of the embedded default: its facts and the phrasings that state them.

The pretraining text (:mod:`.corpus`) and the instruction rows (:mod:`.rows`) share these phrasings, so every
word a response uses was seen in pretraining.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DOLLY_KEYS = ("instruction", "context", "response", "category")
SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ra",
    "ven",
    "tor",
    "sa",
    "bel",
    "dri",
    "mon",
    "qui",
    "zan",
    "fe",
    "lu",
    "or",
    "ta",
    "nis",
    "gor",
    "e",
    "va",
    "pel",
    "rin",
    "so",
    "dak",
)
JOBS = (
    "baker",
    "pilot",
    "farmer",
    "doctor",
    "teacher",
    "painter",
    "sailor",
    "miner",
    "weaver",
    "potter",
    "singer",
    "builder",
)
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
LANGUAGES = ("Orlan", "Vesk", "Tamir", "Dunic", "Soral")  # each spoken in several countries
GOODS = (
    "tea",
    "copper",
    "wool",
    "salt",
    "rice",
    "glass",
    "silk",
    "timber",
    "honey",
    "apples",
    "cheese",
    "olives",
    "tin",
    "pearls",
)
ANIMALS = {  # name: (class, habitat, diet): real animals, simplified
    "fox": ("mammal", "forest", "mice"),
    "owl": ("bird", "forest", "mice"),
    "deer": ("mammal", "forest", "leaves"),
    "bear": ("mammal", "mountains", "berries"),
    "eagle": ("bird", "mountains", "fish"),
    "goat": ("mammal", "mountains", "grass"),
    "trout": ("fish", "river", "insects"),
    "otter": ("mammal", "river", "fish"),
    "frog": ("amphibian", "river", "insects"),
    "camel": ("mammal", "desert", "dry plants"),
    "lizard": ("reptile", "desert", "insects"),
    "scorpion": ("arachnid", "desert", "beetles"),
    "shark": ("fish", "sea", "seals"),
    "seal": ("mammal", "sea", "fish"),
    "crab": ("crustacean", "sea", "algae"),
    "bee": ("insect", "meadow", "nectar"),
    "rabbit": ("mammal", "meadow", "grass"),
    "lark": ("bird", "meadow", "seeds"),
}
HABITATS = tuple(dict.fromkeys(h for _, h, _ in ANIMALS.values()))
CLASSES = "a bird, a fish, a mammal, a reptile, an amphibian, an insect, an arachnid or a crustacean"
CATEGORY_WEIGHTS = {
    "open_qa": 4,
    "general_qa": 4,
    "classification": 2,
    "brainstorming": 1,
    "creative_writing": 1,
    "closed_qa": 3,
    "information_extraction": 2,
    "summarization": 2,
}
Stranger = tuple[str, tuple[str, str, str, str, str]]  # name, (city, job, pet, colour, country)


@dataclass(frozen=True)
class World:
    """Every fact the base model is pretrained on and the instruction rows ask about."""

    countries: dict[str, tuple[str, str, str]]  # country: (capital, language, export)
    people: dict[str, tuple[str, str, str, str]]  # person: (city, job, pet, colour)
    # Names for strangers, people with random facts that only a context can tell. A fixed pool, like real
    # first names, so that each is a frequent, well-trained token sequence the model learns to copy.
    first_names: tuple[str, ...]

    def country_of(self, city: str) -> str:
        return next(c for c, (cap, _, _) in self.countries.items() if cap == city)


def make_name(rng: random.Random, parts: int, taken: set[str]) -> str:
    """A fresh pronounceable name, never one already in ``taken`` (which it joins)."""
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()
        if name not in taken and 3 < len(name) < 10:
            taken.add(name)
            return name


def build_world(seed: int = 0, n_countries: int = 12, n_people: int = 24, n_first_names: int = 64) -> World:
    """Small on purpose: a 1 M-parameter model memorises these ~200 facts in a minute of pretraining."""
    rng, taken = random.Random(seed), set()
    countries = {}
    for _ in range(n_countries):
        country = make_name(rng, 2, taken) + rng.choice(["ia", "land", "or"])
        countries[country] = (make_name(rng, 2, taken), rng.choice(LANGUAGES), rng.choice(GOODS))
    cities = [cap for cap, _, _ in countries.values()]
    people = {
        make_name(rng, 2, taken): (
            rng.choice(cities),
            rng.choice(JOBS),
            rng.choice(list(ANIMALS)),
            rng.choice(COLOURS),
        )
        for _ in range(n_people)
    }
    return World(countries, people, tuple(make_name(rng, 2, taken) for _ in range(n_first_names)))


def strangers(world: World, rng: random.Random, k: int) -> list[Stranger]:
    """``k`` people with random facts: what is asked about them can only be read from a context."""
    group = []
    for name in rng.sample(world.first_names, k):
        country = rng.choice(list(world.countries))
        city = world.countries[country][0]
        pet, job, colour = rng.choice(list(ANIMALS)), rng.choice(JOBS), rng.choice(COLOURS)
        group.append((name, (city, job, pet, colour, country)))
    return group


# The phrasings shared by the pretraining text and the responses.
def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def person_sentences(name: str, city: str, job: str, pet: str, colour: str, country: str) -> list[str]:
    return [
        f"{name} lives in {city}, in {country}.",
        f"{name} works as {article(job)}.",
        f"{name} has a pet {pet}.",
        f"{name}'s favourite colour is {colour}.",
    ]


def summary(name: str, city: str, job: str, pet: str) -> str:
    return f"In short, {name} is {article(job)} from {city} who has a pet {pet}."


def story(name: str, city: str, job: str, pet: str, colour: str) -> str:
    return f"One morning {name} the {job} left {city} with {article(colour)} bag and a pet {pet}."


def verse(animal: str) -> str:
    cls, habitat, diet = ANIMALS[animal]
    return (
        f"In the {habitat} lives the {animal},\nit eats {diet} all day long,\n"
        f"{article(cls)} of the {habitat},\n"
    )


def habitat_sentence(habitat: str) -> str:
    names = [f"the {a}" for a, (_, h, _) in ANIMALS.items() if h == habitat]
    return f"Animals of the {habitat} include {join_and(names)}."


def classes_sentence(animals: list[str]) -> str:
    return join_and([f"the {a} is {article(ANIMALS[a][0])}" for a in animals]).capitalize() + "."


def places_sentence(countries: list[str], cities: list[str]) -> str:
    return f"{join_and(countries)} are countries, and {join_and(cities)} are cities."
