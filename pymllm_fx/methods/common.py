"""Small helpers the method files share."""

from __future__ import annotations

from typing import Iterable


def check_config_keys(method: str, config: dict, accepted: Iterable[str]) -> None:
    """Refuse keys a method does not understand, instead of silently ignoring a typo."""
    allowed = set(accepted) | {"quant_method"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(
            f"quantization_config for {method!r} has unknown keys {unknown}; "
            f"accepted keys: {sorted(allowed)}"
        )
