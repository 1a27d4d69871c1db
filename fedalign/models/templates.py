"""Chat templates: the one source of prompt formatting for training, DPO and evaluation.

Every template ends an assistant turn with the tokenizer's EOS inside ``{% generation %}`` so that the EOS is
a trained completion token, and renders a prompt with ``add_generation_prompt=True`` as an exact prefix of
the same prompt followed by its completion (TRL's completion mask relies on that).
"""

from __future__ import annotations

from pathlib import Path

from fedalign.errors import ModelError

# For base models that ship no template (e.g. Llama-2-7b-hf). Same wording as the Alpaca template the FedASK
# and OpenFedLLM code train with, so numbers stay comparable.
ALPACA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% else %}Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}### Response:\n"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)

# For the embedded tiny models, whose tokenizers have these role markers as special tokens.
CHATML = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>\n"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}\n"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# The FedASK code's MetaMathQA template ("kpmath"): answers end with "The answer is: N", which the
# MetaMath-style GSM8K extraction reads (evaluators.md §2.3, §6).
KPMATH = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}User: Please reason step by step and put your final answer at the end "
    "with \"The answer is: \".\n\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}Assistant:\n"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:\n{% endif %}"
)

BUILTIN = {"alpaca": ALPACA, "chatml": CHATML, "kpmath": KPMATH}


def resolve_chat_template(
    choice: str | None, existing: str | None, source: str = "the model's own template"
) -> str:
    """The template a run uses: the recipe's choice, else the tokenizer's own (from ``source``, checked to
    compile), else Alpaca."""
    if choice is None:
        if isinstance(existing, str) and existing:
            check_template_compiles(existing, source, "model.name_or_path")
        return existing or ALPACA
    if choice in BUILTIN:
        return BUILTIN[choice]
    path = Path(choice)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ModelError(f"model.chat_template: {choice}: not UTF-8 text") from None
        check_template_compiles(text, choice)
        return text
    raise ModelError(
        f"model.chat_template: {choice!r} is neither a built-in template ({', '.join(BUILTIN)}) "
        "nor a readable .jinja file"
    )


def check_template_compiles(text: str, where: str, key: str = "model.chat_template") -> None:
    """Compile the template as transformers will (its sandbox and ``{% generation %}`` tag), so a syntax
    error is one line naming the file and line, not a traceback at the first batch."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(text)
    except TemplateSyntaxError as error:
        raise ModelError(f"{key}: {where}: line {error.lineno}: {error.message}") from None
