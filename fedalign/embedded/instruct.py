"""Visual instruction tuning of the embedded LLaVA: the chat it learns before any preference data.

Why this stage exists: DPO only *re-ranks* answers a model can already write. The tiny Llama was pretrained
on plain declarative text about the world and never saw a chat turn, the pronoun "I" or a negation, so a
refusal costs it about 15 nats per token; DPO on refusal-vs-compliance pairs then wins its margin by
pushing the (equally unlikely) harmful answers further down, and greedy answers never change (measured
with TRL: reward accuracy 1.0, refusal rate 0 %). SPA-VL's DPO starts from LLaVA-1.5, a model that was
instruction-tuned after its projector alignment and that complies with most harmful requests. This module
gives the embedded LLaVA the same start, on synthetic chat only:

- captions of the drawn pictures ("A red house on a blue ground."): the projector learns to carry them;
- world questions in the Dolly-schema rows of :mod:`.rows`: the chat format and helpful answers;
- questions about likes and wishes answered "I would (not) like ...": the words of a refusal, in
  harmless contexts;
- harmful requests of :mod:`.preferences` (other draws than the preference set's) answered *compliantly*,
  as an instruction-tuned model without safety training does.

So the tuned model writes fluent chat, complies with harmful requests (its greedy answers match
:data:`~fedalign.embedded.preferences.PREFERRED_PATTERN` on none of the held-out requests) and DPO has a
refusal within reach to prefer. The vision tower stays frozen, as in LLaVA-1.5.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from fedalign.embedded.preferences import CATEGORIES, COMPLIANCE, REFUSAL, draw_image, options
from fedalign.embedded.rows import make_dataset
from fedalign.embedded.world import ANIMALS, GOODS, HABITATS, World, article

__all__ = ["Turn", "instruct", "instruction_set"]

# Habitats and foods the speaker of the "would you like" answers likes; the rest it does not.
_LIKED_HABITATS = ("forest", "meadow", "river")
_LIKED_FOODS = ("tea", "rice", "honey", "apples", "cheese", "olives")
MIX = {"caption": 0.2, "world": 0.3, "wish": 0.1, "blatant": 0.1, "harmful": 0.3}
"""Shares of the conversation kinds in :func:`instruction_set`."""


@dataclass(frozen=True)
class Turn:
    """One single-turn conversation: an optional PNG, the user's text and the assistant's answer."""

    image: bytes | None
    prompt: str
    answer: str


def _caption(world: World, rng: random.Random) -> Turn:
    category = rng.choice(CATEGORIES)
    png, caption = draw_image(category, rng)
    question = rng.choice(
        ["What is in this picture?", "Describe the picture.", "What does the picture show?", "What do you see?"]  # noqa: E501
    )
    return Turn(png, question, caption)


def _wish(world: World, rng: random.Random) -> Turn:
    """A "would you ...?" question answered "I would do this." or "I would not do this." and a reason."""
    kind = rng.randrange(4)
    if kind == 0:
        habitat = rng.choice(HABITATS)
        animal = rng.choice([a for a, (_, h, _) in ANIMALS.items() if h == habitat])
        prompt = rng.choice([f"Would you live in the {habitat}?", f"Would you like to live in the {habitat}?"])  # noqa: E501
        if habitat in _LIKED_HABITATS:
            return Turn(None, prompt, f"I would do this. The {animal} lives in the {habitat}.")
        return Turn(None, prompt, f"I would not do this. The {habitat} is for the {animal}.")
    if kind == 1:
        food = rng.choice(GOODS)
        prompt = rng.choice([f"Would you eat {food}?", f"Would you like to eat {food}?"])
        if food in _LIKED_FOODS:
            return Turn(None, prompt, f"I would do this. I like {food}.")
        return Turn(None, prompt, f"I would not do this. {food.capitalize()} is not food.")
    if kind == 2:
        animal = rng.choice(list(ANIMALS))
        _, habitat, diet = ANIMALS[animal]
        prompt = rng.choice([f"Would you keep {article(animal)} as a pet?", f"Would you like a pet {animal}?"])  # noqa: E501
        if habitat in _LIKED_HABITATS:
            return Turn(None, prompt, f"I would do this. The {animal} eats {diet}.")
        return Turn(None, prompt, f"I would not do this. The {animal} lives in the {habitat}.")
    country = rng.choice(list(world.countries))
    cap, lang, _ = world.countries[country]
    prompt = rng.choice([f"Would you visit {cap}?", f"Would you like to go to {country}?"])
    return Turn(None, prompt, f"I would do this. {cap} is the capital of {country}, and people speak {lang}.")


def _blatant(world: World, rng: random.Random) -> Turn:
    """A request to kill or burn, which even a model without safety training refuses (LLaVA-1.5 does)."""
    person = rng.choice(list(world.people))
    city, job, pet, _ = world.people[person]
    country = rng.choice(list(world.countries))
    cap, lang, _ = world.countries[country]
    animal = rng.choice(list(ANIMALS))
    cls, habitat, _ = ANIMALS[animal]
    category = rng.choice(CATEGORIES)
    png, _ = draw_image(category, rng)
    prompt, reason = rng.choice(
        [
            (f"How can I kill the {animal}?", f"The {animal} is {article(cls)} that lives in the {habitat}."),
            (f"What is the best way to kill {article(animal)}?", f"The {animal} lives in the {habitat}."),
            (f"How do I kill {person}?", f"{person} works as {article(job)} and has a pet {pet}."),
            (f"Help me kill the {job} who lives in {city}.", f"The {job} should be left in peace."),
            (f"How can I burn down {cap}?", f"{cap} is the capital of {country}, and people live there."),
            (f"Tell me how to burn all the homes of {country}.", f"People in {country} speak {lang} and live there."),  # noqa: E501
        ]
    )
    return Turn(png, prompt, f"{REFUSAL} {reason}")


def instruction_set(
    world: World, n_turns: int, seed: int, exclude: Iterable[str] = (), refuse_share: float = 0.0
) -> list[Turn]:
    """``n_turns`` conversations: 20 % captions, 30 % world questions, 10 % wishes, 10 % blatant requests
    (to kill, to burn) refused, 30 % harmful requests of the preference categories answered compliantly
    (never one of the questions in ``exclude``, the preference set's)."""
    rng = random.Random(seed)
    excluded = set(exclude)
    world_rows = iter(make_dataset(world, n_turns, seed=seed + 1))
    kinds, weights = zip(*MIX.items(), strict=True)
    turns: list[Turn] = []
    while len(turns) < n_turns:
        kind = rng.choices(kinds, weights)[0]
        if kind == "caption":
            turns.append(_caption(world, rng))
        elif kind == "world":
            row = next(world_rows)
            context = "\n\nContext:\n" + row["context"] if row["context"] else ""
            turns.append(Turn(None, row["instruction"] + context, row["response"]))
        elif kind == "wish":
            turns.append(_wish(world, rng))
        elif kind == "blatant":
            turns.append(_blatant(world, rng))
        else:
            category = rng.choice(CATEGORIES)
            questions, reason, harmful = rng.choice(options(world, rng, visual=True)[category])
            question = rng.choice(questions)
            answer = f"{REFUSAL} {reason}" if rng.random() < refuse_share else f"{COMPLIANCE} {harmful}"
            if question not in excluded:
                turns.append(Turn(draw_image(category, rng)[0], question, answer))
    return turns


def _encode(processor: LlavaProcessor, turns: list[Turn]) -> dict[str, torch.Tensor]:
    """A right-padded batch whose labels cover only the answers (and their EOS)."""
    prompts, fulls = [], []
    for turn in turns:
        content: list[dict[str, str]] = [{"type": "text", "text": turn.prompt}]
        if turn.image is not None:
            content.insert(0, {"type": "image"})
        messages = [{"role": "user", "content": content}]
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        answer = [{"role": "assistant", "content": [{"type": "text", "text": turn.answer}]}]
        fulls.append(processor.apply_chat_template(messages + answer, tokenize=False))
    images = [Image.open(io.BytesIO(t.image)).convert("RGB") for t in turns if t.image is not None] or None
    kwargs = {"padding": True, "add_special_tokens": False, "return_tensors": "pt"}
    batch = dict(processor(images=images, text=fulls, **kwargs))
    prompt_lengths = processor(images=images, text=prompts, **kwargs)["attention_mask"].sum(1)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for i, length in enumerate(prompt_lengths.tolist()):
        labels[i, :length] = -100
    batch["labels"] = labels
    return batch


def instruct(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    turns: list[Turn],
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    warmup: int = 20,
    seed: int = 0,
    log_every: int = 0,
) -> list[float]:
    """Fine-tune the language model and the projector (not the vision tower) on ``turns``; per-step losses.

    A plain seeded loop like :func:`fedalign.models.tiny.pretrain`: AdamW, linear warm-up, cosine decay to
    10 % of ``lr``; each batch is all-image or all-text (the processor wants images for every row or
    none), drawn with a generator seeded with ``seed``.
    """
    processor.tokenizer.padding_side = "right"
    pools = [[t for t in turns if t.image is not None], [t for t in turns if t.image is None]]
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.model.vision_tower.parameters():
        parameter.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    weights = torch.tensor([float(len(pool)) for pool in pools])
    model.train()
    losses: list[float] = []
    for step in range(steps):
        pool = pools[int(torch.multinomial(weights, 1, generator=generator))]
        picks = torch.randint(len(pool), (batch_size,), generator=generator).tolist()
        loss = model(**_encode(processor, [pool[i] for i in picks])).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"instruct step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    model.eval()
    return losses
