"""The choices a decomposition offers (schemes, bases, methods, scheme 2's orders) and the rule of a method's
options: plain Python, so that a config is checked without loading torch."""
from __future__ import annotations

from lrx.base.errors import UserError
from lrx.base.yamlread import is_finite_number, is_number, key_text, show

__all__ = ["SCHEMES", "CHANNEL", "TUCKER", "AUTO", "EXPANSIONS", "BASES", "METHODS", "ORDERS", "ALTERNATING_DEFAULTS", "METHOD_OPTIONS", "MAX_ITERATIONS",
           "check_method_options", "check_choice"]

SCHEMES = ("v1", "v2")  # the paper's two schemes, for convs with a kernel larger than 1x1
CHANNEL = "channel"  # 1x1 convs and linear layers: W (N x C) as C -> R -> N (lrx.nn.channel)
TUCKER = "tucker2"  # KxK convs: 1x1 C -> R1, KxK R1 -> R2, 1x1 R2 -> N (lrx.nn.tucker)
# Per layer: scheme v2 for a conv with a larger kernel, the channel scheme for a 1x1 conv or a linear layer; a
# plan (latency, MACs or speedup) also weighs Tucker-2 for a conv with a larger kernel.
AUTO = "auto"
EXPANSIONS = SCHEMES + (CHANNEL, TUCKER, AUTO)  # what decompose.scheme and lrx.expand(scheme=...) take
BASES = ("shared", "per-channel")
METHODS = ("svd", "alternating")
# Scheme 2's order: the vertical (dh x 1) conv first, the horizontal (1 x dw) first, or per layer the cheaper.
ORDERS = ("vh", "hv", "auto")
# Options of scheme1_alternating and their defaults (config `decompose.options`).
ALTERNATING_DEFAULTS = {"lam": 0.03, "lam_start": None, "lam_growth": 1.5, "iterations": 100, "tol": 1e-7}
METHOD_OPTIONS = {"svd": (), "alternating": ("lam", "lam_start", "lam_growth", "iterations", "tol")}
MAX_ITERATIONS = 100_000


def check_method_options(method: str, options: dict) -> None:
    """Refuse, with a UserError keyed ``decompose.options[.name]``, options that ``method`` does not take
    (see :data:`METHOD_OPTIONS`) or values it cannot use: numbers (``lam_start`` may be null),
    ``lam``, ``lam_start``, ``tol`` >= 0, ``lam_growth`` >= 1, ``iterations`` an integer in 0..100000."""
    allowed = METHOD_OPTIONS[method]
    if options and not allowed:
        others = ", ".join(f"{m} ({', '.join(names)})" for m, names in METHOD_OPTIONS.items() if names)
        raise UserError(f"method {method} takes no options, got {show(sorted(map(str, options)))}; "
                        f"methods with options: {others}", key="decompose.options")
    for name, value in options.items():
        key = f"decompose.options.{key_text(name)}"
        if name not in allowed:
            raise UserError(f"unknown option {show(name)} of method {method}; allowed: {', '.join(allowed)}", key=key)
        if name == "lam_start" and value is None:
            continue
        if name == "iterations" and not (is_number(value) and isinstance(value, int) and 0 <= value <= MAX_ITERATIONS):
            raise UserError(f"must be an integer in 0..{MAX_ITERATIONS}, got {show(value)}", key=key)
        if not is_finite_number(value):
            null = " or null" if name == "lam_start" else ""
            raise UserError(f"must be a finite number{null}, got {show(value)}", key=key)
        low = 1 if name == "lam_growth" else 0
        if value < low:
            raise UserError(f"must be >= {low}, got {show(value)}", key=key)
    if options.get("lam", 0) > 0 and options.get("lam_start", 1) == 0:
        raise UserError("must be > 0 when lam > 0 (it grows geometrically towards lam)", key="decompose.options.lam_start")


def check_choice(value, allowed, what: str) -> None:
    if value not in allowed:
        raise UserError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
