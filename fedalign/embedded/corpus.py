"""Plain declarative pretraining text about the world: no questions, instructions or chat turns."""

from __future__ import annotations

import random

from fedalign.embedded.world import (
    ANIMALS,
    HABITATS,
    World,
    article,
    classes_sentence,
    habitat_sentence,
    join_and,
    person_sentences,
    places_sentence,
    story,
    strangers,
    summary,
    verse,
)


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
