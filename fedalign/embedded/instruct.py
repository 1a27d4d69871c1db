"""Visual instruction tuning of the embedded LLaVA: the chat it knows before it sees a preference pair.

DPO re-ranks answers a model can already write; it does not teach a new one. The tiny Llama was pretrained
on plain declarative text about the world and never saw a chat turn, the pronoun "I" or a negation: a
refusal costs it about 15 nats a token. Measured with TRL's DPOTrainer on it (LoRA on q/v, 200-300
steps, lr 3e-4 to 5e-3, beta 0.005 to 0.3, also ``apo_zero``): reward accuracy reaches 1.0 because the
equally unlikely harmful answers are pushed further down, but no greedy answer ever opens with the
refusal, and small betas collapse the model into repeated tokens. SPA-VL's DPO starts from LLaVA-1.5, a
model that was instruction-tuned after its projector alignment, that can refuse and that complies with
most harmful requests. This module gives the embedded LLaVA the same start, on synthetic chat only:

- captions of the drawn pictures ("A red house on a blue ground."), so the projector carries them;
- blatant requests (to kill an animal or a person, to burn a city) refused with :data:`.preferences.REFUSAL`
  and a fact, as instruction-tuned models refuse them before any safety tuning;
- the preference set's kinds of harmful requests (other draws: never a question of the preference set)
  answered with :data:`.preferences.COMPLIANCE` and the instructions, and one time in ten refused.

The tuned model writes both openers fluently, its greedy answers to the preference set's held-out
requests comply (the refusal is the second most likely opener, at about 10 %) and DPO has a refusal within
reach to prefer. There is deliberately no general question answering: with a third answer style to fall
back on, DPO's pressure against "Sure." moved greedy answers to that style instead of to the refusal.
The vision tower stays frozen, as in LLaVA-1.5.
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
from fedalign.embedded.world import ANIMALS, World, article

__all__ = ["MIX", "Turn", "greedy_answers", "instruct", "instruction_set"]

MIX = {"caption": 0.15, "blatant": 0.15, "harmful": 0.7}
"""Shares of the conversation kinds in :func:`instruction_set`."""


@dataclass(frozen=True)
class Turn:
    """One single-turn conversation: an optional PNG, the user's text and the assistant's answer."""

    image: bytes | None
    prompt: str
    answer: str


def _caption(rng: random.Random) -> Turn:
    png, caption = draw_image(rng.choice(CATEGORIES), rng)
    question = rng.choice(
        [
            "What is in this picture?",
            "Describe the picture.",
            "What does the picture show?",
            "What do you see?",
        ]
    )
    return Turn(png, question, caption)


def _blatant(world: World, rng: random.Random) -> Turn:
    """A request to kill or burn, which even a model without safety tuning refuses (LLaVA-1.5 does)."""
    person = rng.choice(list(world.people))
    city, job, pet, _ = world.people[person]
    country = rng.choice(list(world.countries))
    cap, lang, _ = world.countries[country]
    animal = rng.choice(list(ANIMALS))
    cls, habitat, _ = ANIMALS[animal]
    png, _ = draw_image(rng.choice(CATEGORIES), rng)
    prompt, fact = rng.choice(
        [
            (f"How can I kill the {animal}?", f"The {animal} is {article(cls)} that lives in the {habitat}."),
            (f"What is the best way to kill {article(animal)}?", f"The {animal} lives in the {habitat}."),
            (f"How do I kill {person}?", f"{person} works as {article(job)} and has a pet {pet}."),
            (f"Help me kill the {job} who lives in {city}.", f"The {job} should be left in peace."),
            (f"How can I burn down {cap}?", f"{cap} is the capital of {country}, and people live there."),
            (
                f"Tell me how to burn all the homes of {country}.",
                f"People in {country} speak {lang} and live there.",
            ),
        ]
    )
    return Turn(png, prompt, f"{REFUSAL} {fact}")


def instruction_set(
    world: World, n_turns: int, seed: int, exclude: Iterable[str] = (), refuse_share: float = 0.1
) -> list[Turn]:
    """``n_turns`` conversations, all with a picture, drawn in the :data:`MIX` shares; harmful requests are
    refused with probability ``refuse_share``. A harmful request that is one of the questions in
    ``exclude`` is dropped, so with the preference sets excluded the shares come out at about 19 %
    captions, 25 % blatant requests and 51 % harmful ones (46 % of all turns comply)."""
    rng = random.Random(seed)
    excluded = set(exclude)
    kinds, weights = zip(*MIX.items(), strict=True)
    turns: list[Turn] = []
    while len(turns) < n_turns:
        kind = rng.choices(kinds, weights)[0]
        if kind == "caption":
            turns.append(_caption(rng))
        elif kind == "blatant":
            turns.append(_blatant(world, rng))
        else:
            category = rng.choice(CATEGORIES)
            questions, fact, harmful = rng.choice(options(world, rng, visual=True)[category])
            question = rng.choice(questions)
            answer = f"{REFUSAL} {fact}" if rng.random() < refuse_share else f"{COMPLIANCE} {harmful}"
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
    lr: float = 2e-3,
    warmup: int = 20,
    seed: int = 0,
    log_every: int = 0,
) -> list[float]:
    """Fine-tune the language model and the projector (not the vision tower) on ``turns``; per-step losses.

    A plain seeded loop like :func:`fedalign.models.tiny.pretrain`: AdamW, linear warm-up, cosine decay to
    10 % of ``lr``; each batch is all-image or all-text (the processor wants images for every row or
    none), drawn with a generator seeded with ``seed``. The model is left in eval mode.
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


@torch.no_grad()
def greedy_answers(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    questions: list[tuple[bytes, str]],
    max_new_tokens: int = 8,
    batch_size: int = 64,
) -> list[str]:
    """Greedy answers to (PNG, question) pairs through the chat template: how the build measures the
    preferred-behaviour rate of the tuned model before any DPO."""
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for _, question in chunk
        ]
        images = [Image.open(io.BytesIO(png)).convert("RGB") for png, _ in chunk]
        inputs = processor(
            images=images, text=texts, padding=True, add_special_tokens=False, return_tensors="pt"
        )
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    tokenizer.padding_side = side
    return answers
