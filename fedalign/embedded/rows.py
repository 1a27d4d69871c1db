"""Instruction rows in databricks-dolly-15k's schema whose responses follow from instruction and context."""

from __future__ import annotations

import random

from fedalign.embedded.world import (
    ANIMALS,
    CATEGORY_WEIGHTS,
    CLASSES,
    DOLLY_KEYS,
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
