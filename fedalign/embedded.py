"""The embedded default: a made-up world, a Dolly-schema instruction set about it and a tiny Llama knowing it.

The quickstart must run offline on a laptop CPU and still show that federated LoRA SFT *works*. A random
model cannot show that (LoRA leaves its loss near chance) and no real checkpoint can be downloaded. So this
module invents a small world (fictional countries with capitals, languages and exports; people with a home
city, job, pet and colour; real animals with class, habitat and diet), pretrains a ~1 M-parameter Llama on
plain declarative text about it, and writes instruction rows in the exact databricks-dolly-15k schema whose
responses are deterministic functions of the instruction and context. The base model then knows the words,
the facts and how to copy from a passage, but not the chat format nor which instruction asks for what:
that is what LoRA SFT has to teach.

    python -m fedalign.embedded --out data      # writes data/quickstart/ and data/tiny-llama/
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedalign.models.tiny import build_tiny_llama, build_tokenizer, pretrain

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


def corpus(world: World, rng: random.Random, repeats: int) -> list[str]:
    """The pretraining text: ``repeats`` passes of :func:`documents`, shuffled."""
    docs = [doc for _ in range(repeats) for doc in documents(world, rng)]
    rng.shuffle(docs)
    return docs


def documents(world: World, rng: random.Random) -> list[str]:
    """One pass over the world in fresh wording and order, plus passages about strangers.

    Plain text only, never a question, an instruction or a chat turn. Every phrase a response uses appears
    here in some form, so that no response token is one the base model was never trained to predict.
    Passages about strangers end by recalling one of their facts, which teaches reading from a context.
    """

    def text(sentences: list[str], shuffle: bool = True) -> str:
        """Joined by a space or a newline at random: " Ana" and "Ana" at a line start are different tokens,
        and seeing both in one passage teaches the model to copy one as the other."""
        if shuffle:
            rng.shuffle(sentences)
        return sentences[0] + "".join(rng.choice([" ", "\n"]) + s for s in sentences[1:])

    docs = []
    for country, (cap, lang, good) in [*world.countries.items(), *world.countries.items()]:
        docs.append(
            f"{country} is a country. "
            + text(
                [
                    rng.choice(
                        [f"The capital of {country} is {cap}.", f"{cap} is the capital of {country}."]
                    ),
                    rng.choice([f"People in {country} speak {lang}.", f"{lang} is spoken in {country}."]),
                    rng.choice([f"{country} is known for its {good}.", f"{country} exports {good}."]),
                ]
            )
        )
    for name, (city, job, pet, colour) in world.people.items():
        extra = rng.choice(
            [
                summary(name, city, job, pet).removeprefix("In short, "),
                f"{name} likes {colour} and has a pet {pet}.",
            ]
        )
        docs.append(text([*person_sentences(name, city, job, pet, colour, world.country_of(city)), extra]))
    for animal, (cls, habitat, diet) in ANIMALS.items():
        it = rng.choice([f"The {animal}", article(animal).capitalize()])
        docs.append(text([f"{it} is {article(cls)}.", f"{it} lives in the {habitat}.", f"{it} eats {diet}."]))
    for habitat in HABITATS:
        docs.append(habitat_sentence(habitat))
        animals = [a for a, (_, h, _) in ANIMALS.items() if h == habitat]
        docs.append(f"A song of the {habitat}:\n" + "".join(map(verse, animals)) + "and this is its song.")
    docs.append(classes_sentence(rng.sample(list(ANIMALS), 3)))
    docs.append(
        places_sentence(
            rng.sample(list(world.countries), 2),
            [cap for cap, _, _ in rng.sample(list(world.countries.values()), 2)],
        )
    )
    for _ in range(len(world.people)):
        group = strangers(world, rng, rng.choice([1, 2, 3]))
        name, (city, job, pet, colour, _) = group[0]
        facts = [s for n, args in group for s in person_sentences(n, *args)]
        other, args = rng.choice(group)
        recall = rng.choice(
            [
                [f"Then {other} came back.", rng.choice(person_sentences(other, *args))],
                ["According to the text, " + rng.choice(facts)],
                [summary(name, city, job, pet)],
            ]
        )
        docs.append(text(facts + recall, shuffle=False))
        docs.append(
            story(name, city, job, pet, colour)
            + f" {name} likes {colour}, so {article(colour)} toy for the {pet} would be nice."
        )
        brief = [s for n, args in group for s in rng.sample(person_sentences(n, *args), 2)]
        mentioned = rng.choice([[n for n, _ in group], list(dict.fromkeys(a[0] for _, a in group))])
        docs.append(text([*brief, f"The text mentions {join_and(mentioned)}."], shuffle=False))
    return docs


def make_row(world: World, rng: random.Random, category: str) -> tuple[str, str, str]:
    """One (instruction, context, response) of ``category``; the response follows from the other two."""
    country = rng.choice(list(world.countries))
    cap, lang, good = world.countries[country]
    person = rng.choice(list(world.people))
    city, job, pet, colour = world.people[person]
    animal = rng.choice(list(ANIMALS))
    cls, habitat, diet = ANIMALS[animal]
    an_animal = article(animal)
    if category == "classification":
        if rng.random() < 0.4:
            return f"Is {an_animal} {CLASSES}?", "", f"{an_animal.capitalize()} is {article(cls)}."
        if rng.random() < 0.5:
            picks = rng.sample(list(ANIMALS), 3)
            return f"Classify each animal by its class: {', '.join(picks)}.", "", classes_sentence(picks)
        capitals = [cap for cap, _, _ in world.countries.values()]
        places = rng.sample(list(world.countries), 2) + rng.sample(capitals, 2)
        rng.shuffle(places)
        countries = [n for n in places if n in world.countries]
        return (
            f"Which of these are countries and which are cities? {', '.join(places)}",
            "",
            places_sentence(countries, [n for n in places if n not in countries]),
        )
    where, gift = f"{city}, in {world.country_of(city)}", f"{article(colour)} toy for the {pet} would be nice"
    options: dict[str, list[tuple[tuple[str, ...], str]]] = {  # category: [(the ways to ask, the answer)]
        "open_qa": [
            (
                (
                    f"What is the capital of {country}?",
                    f"Which city is the capital of {country}?",
                    f"Name the capital of {country}.",
                    f"What is {country}'s capital city?",
                ),
                f"The capital of {country} is {cap}.",
            ),
            (
                (
                    f"What language do people speak in {country}?",
                    f"Which language is spoken in {country}?",
                    f"What do people in {country} speak?",
                    f"What is the language of {country}?",
                ),
                f"People in {country} speak {lang}.",
            ),
            (
                (
                    f"What is {country} known for?",
                    f"What does {country} export?",
                    f"What is {country} famous for?",
                    f"Which goods come from {country}?",
                ),
                f"{country} is known for its {good}.",
            ),
            (
                (
                    f"In which country is {cap}?",
                    f"Where is the city of {cap}?",
                    f"{cap} is the capital of what?",
                    f"Which country has {cap} as its capital?",
                ),
                f"{cap} is the capital of {country}.",
            ),
        ],
        "general_qa": [
            (
                (
                    f"Where does {person} live?",
                    f"Which city is {person} from?",
                    f"Where is {person}'s home?",
                    f"In which city does {person} live?",
                ),
                f"{person} lives in {where}.",
            ),
            (
                (
                    f"What does {person} do for a living?",
                    f"What is {person}'s job?",
                    f"What work does {person} do?",
                ),
                f"{person} works as {article(job)}.",
            ),
            (
                (
                    f"What pet does {person} have?",
                    f"Which animal does {person} keep as a pet?",
                    f"Does {person} have a pet?",
                ),
                f"{person} has a pet {pet}.",
            ),
            (
                (f"What is {person}'s favourite colour?", f"Which colour does {person} like best?"),
                f"{person}'s favourite colour is {colour}.",
            ),
            (
                (f"What does {an_animal} eat?", f"What food does {an_animal} eat?"),
                f"{an_animal.capitalize()} eats {diet}.",
            ),
            (
                (f"Where does {an_animal} live?", f"What is the habitat of {an_animal}?"),
                f"{an_animal.capitalize()} lives in the {habitat}.",
            ),
        ],
        "brainstorming": [
            (
                (
                    f"Name some animals that live in the {habitat}.",
                    f"List a few animals of the {habitat}.",
                    f"Which animals could I see in the {habitat}?",
                ),
                habitat_sentence(habitat),
            ),
            (
                (
                    f"Give me a gift idea for {person}.",
                    f"What could I give {person} as a present?",
                    f"Suggest a present for {person}.",
                ),
                f"{person} likes {colour} and has a pet {pet}, so {gift}.",
            ),
        ],
        "creative_writing": [
            (
                (
                    f"Write a short poem about the {animal}.",
                    f"Write a verse about {an_animal}.",
                    f"Compose a little song about the {animal}.",
                ),
                verse(animal) + "and this is its song.",
            ),
            (
                (
                    f"Write a one-sentence story about {person}.",
                    f"Tell me a very short story about {person}.",
                ),
                story(person, city, job, pet, colour),
            ),
        ],
    }
    if category in options:
        questions, answer = rng.choice(options[category])
        return rng.choice(questions), "", answer
    # The context categories are about strangers, so the answer can only be read from the context.
    people = strangers(world, rng, rng.choice([1, 2, 3]))
    name, (s_city, s_job, s_pet, s_colour, s_country) = people[0]
    if category == "summarization":
        context = " ".join(person_sentences(name, s_city, s_job, s_pet, s_colour, s_country))
        return "Summarize this passage in one sentence.", context, summary(name, s_city, s_job, s_pet)
    per_person = 4 if len(people) == 1 else 3  # keeps prompt + completion within 128 tokens
    told = [rng.sample(person_sentences(n, *args), per_person) for n, args in people]
    context = " ".join(" ".join(sentences) for sentences in told)
    if category == "closed_qa":
        fact = rng.choice(told[0])
        question = {
            " lives": f"Where does {name} live?",
            " works": f"What is {name}'s job?",
            " has": f"What pet does {name} have?",
            "'s": f"What is {name}'s favourite colour?",
        }
        asked = next(q for k, q in question.items() if fact.startswith(name + k))
        return asked, context, "According to the text, " + fact
    if rng.random() < 0.5:
        return (
            "Extract the names of the people mentioned in the text.",
            context,
            f"The text mentions {join_and([n for n, _ in people])}.",
        )
    cities = list(dict.fromkeys(c for _, (c, *_) in people if f"in {c}," in context))
    return (
        "List the cities mentioned in the text.",
        context,
        f"The text mentions {join_and(cities)}." if cities else "The text mentions no city.",
    )


def make_dataset(world: World, n_rows: int, seed: int = 0) -> list[dict[str, str]]:
    """``n_rows`` rows with distinct prompts (as in Dolly, so no held-out prompt is also a training one);
    the same ``seed`` gives the same rows in the same order."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    while len(rows) < n_rows:
        category = rng.choices(list(CATEGORY_WEIGHTS), list(CATEGORY_WEIGHTS.values()))[0]
        instruction, context, response = make_row(world, rng, category)
        if (instruction, context) not in seen:
            seen.add((instruction, context))
            rows.append(dict(zip(DOLLY_KEYS, (instruction, context, response, category), strict=True)))
    return rows


DATA_README = """# quickstart: a synthetic Dolly-schema instruction set

`dolly.jsonl` is **synthetic**: {n} rows about a made-up world (fictional countries, capitals, languages and
people; real animals with simplified facts), generated by `python -m fedalign.embedded` (seed {seed}).
Each line is one JSON object with exactly the databricks-dolly-15k keys `instruction`, `context`,
`response` and `category`; the categories are real Dolly category names. Responses are deterministic
functions of the instruction and context, so the tiny model in `../tiny-llama` (pretrained on plain text
about the same world) learns them in a few hundred LoRA steps on a CPU.

Licence: Apache-2.0, the same as the fedalign project. It contains no text from Dolly or any other dataset.
"""

MODEL_README = """# tiny-llama: the embedded base model

A {params:,}-parameter Llama and a byte-level BPE tokenizer ({vocab} tokens, ChatML-style role markers),
built offline by `python -m fedalign.embedded` (seed {seed}, {steps} pretraining steps, final loss
{loss:.3f}). Pretrained only on plain text about the made-up world of `../quickstart`, never on
instructions or chat, so LoRA SFT has the format to teach. For tests and the CPU quickstart; not a real
language model. Licence: Apache-2.0.
"""


def build(out: Path, seed: int = 0, rows: int = 2400, steps: int = 600, repeats: int = 100) -> dict[str, Any]:
    """Write ``out/quickstart`` and ``out/tiny-llama``; returns a few numbers about the build."""
    start = time.perf_counter()
    world = build_world(seed)
    dataset = make_dataset(world, rows, seed)
    # Merges learnt from the documents, which hold every phrase of the contexts and responses, plus the
    # instructions, whose question wording pretraining never shows.
    tokenizer = build_tokenizer(
        [d for _ in range(8) for d in documents(world, random.Random(seed + 2))]
        + [r["instruction"] for r in dataset]
    )
    model = build_tiny_llama(tokenizer, seed=seed)
    tokenizer.model_max_length = model.config.max_position_embeddings  # longer inputs would have no position
    texts = corpus(world, random.Random(seed + 1), repeats)
    losses = pretrain(model, tokenizer, texts, steps=steps, lr=5e-3, seed=seed, log_every=100)
    data_dir, model_dir = out / "quickstart", out / "tiny-llama"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "dolly.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in dataset)
    (data_dir / "README.md").write_text(DATA_README.format(n=len(dataset), seed=seed))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    params = sum(p.numel() for p in model.parameters())
    (model_dir / "README.md").write_text(
        MODEL_README.format(params=params, vocab=len(tokenizer), seed=seed, steps=steps, loss=losses[-1])
    )
    return {"params": params, "final_loss": losses[-1], "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedalign.embedded", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data"), help="folder to write into (default: data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=2400, help="instruction rows to generate")
    parser.add_argument("--quick", action="store_true", help="40 pretraining steps: for tests, a weak model")
    args = parser.parse_args(argv)
    steps, repeats = (40, 2) if args.quick else (600, 100)
    stats = build(args.out, args.seed, args.rows, steps=steps, repeats=repeats)
    print(
        f"wrote {args.out}/quickstart and {args.out}/tiny-llama: {stats['params']:,} parameters, "
        f"final pretraining loss {stats['final_loss']:.3f}, {stats['seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
