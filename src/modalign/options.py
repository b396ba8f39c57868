"""Component options: dataclasses that validate themselves, one style for every component.

    @dataclass
    class EncoderConfig(Options):
        width: int = 128
        kind: str = "transformer"

        def validate(self) -> None:
            at_least(self, "width", 1)
            one_of(self, "kind", ("transformer", "cnn"))

Construction validates (`__post_init__`), so an invalid encoder, head, bottleneck, loss, trainer or
optimizer setting cannot exist, wherever it is built: from the config at the edge, from a
checkpoint's model_config, or in code. A failed check raises OptionError naming the field, its
value and the rule; `modalign.recipes.config.typed` adds the config section, so the user reads one
line such as `config: 'encoder.width' is 0; it must be >= 1`. No torch, no Hydra.
"""

from __future__ import annotations

import math

from modalign.errors import UserError


class OptionError(UserError):
    """An option's value breaks its rule. `field` is the dotted name inside its dataclass."""

    def __init__(self, field: str, value, why: str):
        self.field, self.value, self.why = field, value, why
        super().__init__(f"'{field}' is {_show(value)}; {why}")

    def under(self, section: str) -> "OptionError":
        """The same error with the config section in front of the field (encoder.width)."""
        return OptionError(f"{section}.{self.field}" if section else self.field, self.value, self.why)


def _show(value) -> str:
    return "nan" if isinstance(value, float) and math.isnan(value) else repr(value)


class Options:
    """Mix-in for option dataclasses: validate() runs after __init__; override it."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        pass


def _number(obj, name: str):
    value = getattr(obj, name)
    if isinstance(value, float) and math.isnan(value):
        raise OptionError(name, value, "it must be a number")
    return value


def at_least(obj, name: str, low) -> None:
    value = _number(obj, name)
    if value < low:
        raise OptionError(name, value, f"it must be >= {low}")


def at_most(obj, name: str, high) -> None:
    value = _number(obj, name)
    if value > high:
        raise OptionError(name, value, f"it must be <= {high}")


def between(obj, name: str, low, high) -> None:
    at_least(obj, name, low)
    at_most(obj, name, high)


def one_of(obj, name: str, choices) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise OptionError(name, value, f"expected one of {', '.join(map(str, choices))}")


def require(ok: bool, name: str, value, why: str) -> None:
    """A rule that relates fields (e.g. width divisible by heads): raise when `ok` is False."""
    if not ok:
        raise OptionError(name, value, why)
