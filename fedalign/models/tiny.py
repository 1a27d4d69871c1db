"""Offline builders for the embedded tiny models: a byte-level BPE tokenizer and a small Llama.

Nothing here touches the network. The tokenizer is trained with ``tokenizers`` on a corpus the caller
passes, the model is built from a config, and ``pretrain`` is a plain, seeded torch loop (no Trainer, no
accelerate) so that the embedded default rebuilds the same way on any CPU in seconds. The global torch
RNG and thread count are left as the caller set them: every random draw here comes from a seeded
generator or a forked RNG.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedalign.models.templates import CHATML

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``corpus``, with the ChatML-style role markers as special tokens.

    Byte level means any text encodes (no ``<unk>`` in practice), so prompts outside the corpus still work.
    The role markers are special tokens so the chat template's turn boundaries are single, unsplittable
    tokens: a rendered prompt is then always a token prefix of the prompt plus its completion.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD, UNK, *ROLE_MARKERS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_MARKERS),
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 320,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A small Llama whose special-token ids agree with ``tokenizer`` (about 1 M parameters by default).

    The weights are initialised under a forked RNG seeded with ``seed``, so building a model neither depends
    on nor disturbs the caller's global torch RNG. Input and output embeddings are untied, as in Llama-2.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def pack(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], block_size: int) -> torch.Tensor:
    """Concatenate ``<s> text </s>`` documents and cut the stream into ``block_size`` rows (tail dropped).

    Packing wastes no compute on padding, and the document separators teach the model where texts end.
    """
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    rows = len(stream) // block_size
    if rows == 0:
        raise ValueError(f"the texts give {len(stream)} tokens, fewer than one block of {block_size}")
    return torch.tensor(stream[: rows * block_size]).view(rows, block_size)


def pretrain(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    steps: int,
    batch_size: int = 16,
    block_size: int = 128,
    lr: float = 3e-3,
    warmup: int = 20,
    weight_decay: float = 0.01,
    seed: int = 0,
    log_every: int = 0,
) -> list[float]:
    """Plain causal-LM pretraining of all parameters; returns the loss of every step.

    AdamW with linear warm-up and cosine decay to 10 % of ``lr``; batches are drawn from the packed blocks
    by a generator seeded with ``seed``, so two runs with the same arguments give the same weights.
    """
    blocks = pack(tokenizer, texts, block_size)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses: list[float] = []
    for step in range(steps):
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"pretrain step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.eval()
    return losses
