"""fedalign: federated alignment of language and vision-language models with LoRA, on Hugging Face TRL."""

__version__ = "0.1.0"
