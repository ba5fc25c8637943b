"""Floating-point formats for quantized training (``model.precision``): names -> exponent and
mantissa bits, range and special-value convention. Standard library only.

A format is ``none`` (no quantization), a named one, or ``eXmY`` (X exponent bits, Y mantissa
bits, a sign bit; at most 16 bits in all, X >= 1). The named ones are the ``ml_dtypes`` types:

    bf16 = e8m7 (bfloat16)    e4m3 = float8_e4m3fn   e5m2 = float8_e5m2
    e3m2 = float6_e3m2fn      e2m3 = float6_e2m3fn   e2m1 = float4_e2m1fn

Conventions (so that a generic ``eXmY`` is the named format where they coincide):

* ``X >= 5`` (e5m2, bf16): IEEE-like, the top exponent code holds inf/NaN; the largest finite
  value is ``(2 - 2^-M) 2^(2^X - 2 - bias)``.
* 8-bit formats with ``X <= 4`` (e4m3; OCP FP8 "fn"): no inf, one NaN code (all ones), so the
  top binade holds values up to ``(2 - 2^(1-M)) 2^(2^X - 1 - bias)`` (448 for e4m3).
* other formats with ``X <= 4`` (e3m2, e2m3, e2m1; OCP MX FP6/FP4): every code is finite, up to
  ``(2 - 2^-M) 2^(2^X - 1 - bias)``.

``bias = 2^(X-1) - 1``; subnormals everywhere (the smallest normal exponent is ``1 - bias``).

Where ``ml_dtypes`` has another type of the same widths the conventions can differ: its
``float8_e3m4`` and ``float8_e4m3`` (no ``fn``) are IEEE-like (inf codes; max 15.5 and 240),
while our generic ``e3m4`` follows the 8-bit "fn" rule above (max 30) and our ``e4m3`` is
``float8_e4m3fn`` (max 448). ``e5m10`` is IEEE half precision (``numpy.float16``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from scaling.errors import ConfigError

NAMED = {"bf16": (8, 7, "bfloat16"), "e4m3": (4, 3, "float8_e4m3fn"), "e5m2": (5, 2, "float8_e5m2"),
         "e3m2": (3, 2, "float6_e3m2fn"), "e2m3": (2, 3, "float6_e2m3fn"), "e2m1": (2, 1, "float4_e2m1fn")}
_GENERIC = re.compile(r"^e(\d+)m(\d+)$")


@dataclass(frozen=True)
class Format:
    """A float format: ``E`` exponent bits, ``M`` mantissa bits, ``dtype`` its ``ml_dtypes``
    name when there is one (else None)."""

    name: str
    E: int
    M: int
    dtype: str | None = None

    @property
    def bits(self) -> int:
        return 1 + self.E + self.M

    @property
    def bias(self) -> int:
        return 2 ** (self.E - 1) - 1

    @property
    def min_normal_exponent(self) -> int:
        """``emin``: the smallest normal value is ``2^emin``."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        """The exponent of the top binade that holds finite values."""
        top = 2 ** self.E - 1 - self.bias
        return top - 1 if self.E >= 5 else top

    @property
    def max(self) -> float:
        """The largest finite value (module docstring)."""
        if self.E >= 5:
            frac = 2.0 - 2.0 ** -self.M
        elif self.bits == 8:
            frac = 2.0 - 2.0 ** (1 - self.M)
        else:
            frac = 2.0 - 2.0 ** -self.M
        return frac * 2.0 ** self.max_exponent


def parse(text, field: str = "model.precision") -> Format | None:
    """``none`` -> None; a named format or ``eXmY`` -> ``Format``; ConfigError naming ``field``
    otherwise (an unknown name, more than 16 bits, no exponent bit)."""
    s = str(text).strip().lower()
    if s in ("none", "", "fp32", "float32"):
        return None
    if s in NAMED:
        e, m, dtype = NAMED[s]
        return Format(s, e, m, dtype)
    match = _GENERIC.match(s)
    if not match:
        raise ConfigError(f"{field}: unknown format {text!r}; use none, {', '.join(NAMED)} or eXmY (e.g. e3m4)")
    e, m = int(match.group(1)), int(match.group(2))
    if e < 1:
        raise ConfigError(f"{field}: {text!r} has no exponent bit; use at least e1")
    if 1 + e + m > 16:
        raise ConfigError(f"{field}: {text!r} is {1 + e + m} bits (sign + {e} exponent + {m} mantissa); use at most 16")
    if e > 8:
        raise ConfigError(f"{field}: {text!r} has a wider exponent range than float32, the training precision; "
                          "use at most 8 exponent bits")
    for name, (ne, nm, dtype) in NAMED.items():
        if (ne, nm) == (e, m):
            return Format(name, e, m, dtype)
    return Format(s, e, m, None)
