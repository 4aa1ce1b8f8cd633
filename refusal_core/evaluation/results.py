"""Results of attacks and of the over-refusal measure, and their JSON files.

An :class:`AsrResult` holds one attack's run over a prompt set: one
:class:`AttackResult` per prompt (every :class:`Attempt` tried, under which
configuration, and the judge's verdict), the ASR and, for attacks with several
configurations, the rate of each. :class:`OverRefusalResult` is the same kind
of record for harmless prompts, counting refusals instead. Both save to and
load from one JSON file (``format`` ``refusal_core.asr/1``, written atomically).

Example:
    >>> r = AsrResult("vanilla", "substring", [AttackResult("Hi", [Attempt({}, "Sure", True)])])
    >>> (r.asr, r.n_prompts, AsrResult.from_dict(r.to_dict()) == r)
    (1.0, 1, True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from torch import nn

from refusal_core.errors import ArtifactError, RefusalCoreError
from refusal_core.model import model_identity
from refusal_core.saving import atomic_write_json, read_json

__all__ = ["AsrResult", "AttackResult", "Attempt", "OverRefusalResult", "result_model_identity"]

_FORMAT = "refusal_core.asr/1"


def result_model_identity(model: nn.Module) -> dict[str, Any]:
    """The model identity an attack result records: :func:`~refusal_core.model.model_identity`,
    or at least the class name for a causal LM that has none (attacks run on any)."""
    try:
        return model_identity(model)
    except RefusalCoreError:
        return {"class": type(model).__name__}


@dataclass
class Attempt:
    """One completion tried against a prompt: the configuration it came from and the verdict."""

    config: dict[str, Any]
    completion: str
    jailbroken: bool
    #: the judge's own words on this completion (a classifier's raw verdict), None for rule judges
    verdict: str | None = None


@dataclass
class AttackResult:
    """One prompt under one attack: broken when any attempt is jailbroken.

    ``details`` holds attack-specific data (GCG: the suffix, its ids and the
    loss history).
    """

    instruction: str
    attempts: list[Attempt]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def jailbroken(self) -> bool:
        return any(a.jailbroken for a in self.attempts)

    @property
    def completions(self) -> list[str]:
        return [a.completion for a in self.attempts]


def _records_to_json(records: Sequence[AttackResult]) -> list[dict[str, Any]]:
    return [{**asdict(r), "jailbroken": r.jailbroken} for r in records]


def _records_from_json(items: Any) -> list[AttackResult]:
    return [
        AttackResult(
            instruction=str(r["instruction"]),
            attempts=[
                Attempt(
                    dict(a["config"]),
                    str(a["completion"]),
                    bool(a["jailbroken"]),
                    None if a.get("verdict") is None else str(a["verdict"]),
                )
                for a in r["attempts"]
            ],
            details=dict(r.get("details", {})),
        )
        for r in items
    ]


def _read_json(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    p = Path(path)
    data = read_json(p, f"{kind} file")
    if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("kind") != kind:
        raise ArtifactError(f"{str(p)!r} is not a refusal_core {kind} file (format {_FORMAT})")
    return data


class _ResultFile:
    """A judged result over a prompt set kept as one JSON file of kind ``KIND`` (written atomically):
    what ASR and over-refusal results share."""

    KIND: ClassVar[str]
    judge: str
    records: list[AttackResult]
    settings: dict[str, Any]
    model: dict[str, Any]

    @property
    def n_prompts(self) -> int:
        return len(self.records)

    def _file_dict(self, **fields: Any) -> dict[str, Any]:
        """The file's JSON object: the shared keys and the kind's own ``fields``."""
        return {
            "format": _FORMAT,
            "kind": self.KIND,
            "judge": self.judge,
            "n_prompts": self.n_prompts,
            "settings": self.settings,
            "model": self.model,
            "records": _records_to_json(self.records),
            **fields,
        }

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        raise NotImplementedError

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write JSON atomically; returns the path."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        """Read a file :meth:`save` wrote (:class:`ArtifactError` for anything else)."""
        return cls.from_dict(_read_json(path, cls.KIND))


@dataclass
class AsrResult(_ResultFile):
    """Attack success rate of one attack over a prompt set, with every per-prompt record.

    ``config_rates`` maps a configuration label (e.g. ``"T=0.7,p=0.9,k=40"``)
    to the share of prompts that configuration alone breaks.
    """

    KIND: ClassVar[str] = "asr"

    attack: str
    judge: str
    records: list[AttackResult]
    config_rates: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def n_jailbroken(self) -> int:
        return sum(r.jailbroken for r in self.records)

    @property
    def asr(self) -> float:
        """Share of prompts broken, in [0, 1]."""
        return self.n_jailbroken / self.n_prompts if self.records else 0.0

    def to_dict(self) -> dict[str, Any]:
        return self._file_dict(
            attack=self.attack, asr=self.asr, n_jailbroken=self.n_jailbroken, config_rates=self.config_rates
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AsrResult:
        try:
            return cls(
                attack=str(data["attack"]),
                judge=str(data["judge"]),
                records=_records_from_json(data["records"]),
                config_rates={str(k): float(v) for k, v in data.get("config_rates", {}).items()},
                settings=dict(data.get("settings", {})),
                model=dict(data.get("model", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"ASR record is missing or has a malformed field: {exc}") from exc


@dataclass
class OverRefusalResult(_ResultFile):
    """Share of harmless prompts the model refused (the judge said it did not comply)."""

    KIND: ClassVar[str] = "over_refusal"

    judge: str
    records: list[AttackResult]
    settings: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def n_refused(self) -> int:
        return sum(not r.jailbroken for r in self.records)

    @property
    def rate(self) -> float:
        """Share of harmless prompts refused, in [0, 1]."""
        return self.n_refused / self.n_prompts if self.records else 0.0

    def to_dict(self) -> dict[str, Any]:
        return self._file_dict(rate=self.rate, n_refused=self.n_refused)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OverRefusalResult:
        try:
            return cls(
                judge=str(data["judge"]),
                records=_records_from_json(data["records"]),
                settings=dict(data.get("settings", {})),
                model=dict(data.get("model", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"over-refusal record is missing or has a malformed field: {exc}") from exc
