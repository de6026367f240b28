"""What every part of the config shares: the strict frozen model, durations, and secret references.

A duration is ``30m``, ``2h``, ``1h30m`` or a positive number of seconds, at most a year. A
:class:`SecretRef` names a secret held outside hoop (``{env: NAME}`` or ``{file: PATH}``); the
secret itself is never written in the config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator

from broker.duration import parse_duration
from broker.errors import ConfigError, InvalidInput

__all__ = ["Duration", "SecretRef"]

_MAX_SECONDS = 366 * 86400


def _duration(value: object) -> object:
    if isinstance(value, bool):  # (pydantic would take true as 1 second: YAML reads yes, on and true so)
        raise ValueError(f"duration {value!r} is not a duration; use e.g. 30m, 2h, 1h30m, or a number of seconds")
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except InvalidInput as exc:
            raise ValueError(exc.message) from None
    if isinstance(value, int | float):
        # a bare number is seconds, held to the bounds of the text form (and timedelta's range)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"duration {value!r} is not a positive number of seconds; use e.g. 30m, 2h, 1h30m")
        if value > _MAX_SECONDS:
            raise ValueError(f"duration {value!r} is longer than a year")
        return timedelta(seconds=value)
    return value


Duration = Annotated[timedelta, BeforeValidator(_duration)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SecretRef(_Model):
    """A reference to a secret held outside hoop: ``{env: NAME}`` or ``{file: PATH}``.

    The value is never written in the config, never stored and never logged.
    """

    env: str | None = None
    file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _a_reference(cls, value: object) -> object:
        # pydantic said "Input should be a valid dictionary or instance of SecretRef"; the value itself is
        # never repeated, since what was written inline may well be the secret
        if isinstance(value, str | int | float | bool | list):
            raise ValueError("a secret is given by reference, {env: NAME} or {file: PATH}, never written in the "
                             "config")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("a credential reference is exactly one of {env: NAME} or {file: PATH}")
        return self

    def describe(self) -> str:
        return f"env:{self.env}" if self.env is not None else f"file:{self.file}"

    def resolve(self, environ: Mapping[str, str]) -> str:
        """Return the secret. Raises :class:`ConfigError` (naming the reference, not the value)."""
        if self.env is not None:
            value = environ.get(self.env)
            if not value:
                raise ConfigError(f"credential reference env:{self.env} is not set")
            return value
        assert self.file is not None
        try:
            value = self.file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"credential reference file:{self.file} cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"credential reference file:{self.file} is not UTF-8 text") from None
        if not value:  # as for an unset variable: an empty secret is a mistake, never a credential
            raise ConfigError(f"credential reference file:{self.file} is empty")
        return value
