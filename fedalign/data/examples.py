"""The unit every data source produces: one conversational prompt/completion pair with its provenance."""

from __future__ import annotations

from dataclasses import dataclass

Message = dict[str, str]


@dataclass(frozen=True)
class Example:
    """One training row in TRL's conversational prompt/completion format.

    ``row_id`` is the row's position in its source (0-based, stable across runs, what partition manifests
    list); ``origin`` is ``file:line`` (or ``dataset[split]:row``) for error messages; ``label`` is the
    value of the partition label column (Dolly ``category``, MetaMathQA ``type``), if any.
    """

    row_id: int
    origin: str
    prompt: list[Message]
    completion: list[Message]
    label: str | None = None

    def to_record(self) -> dict[str, object]:
        """The row as TRL's SFTTrainer reads it."""
        return {"row_id": self.row_id, "prompt": self.prompt, "completion": self.completion}
