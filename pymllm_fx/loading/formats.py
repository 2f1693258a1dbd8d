"""Checkpoint formats by name, and what their writers share.

A format's writer lives beside its reader, in the method file that loads the format; it is any
object with the two calls of the writer extension of ``layers/quantize_base.py``:

- ``checkpoint_config(sites, floats) -> dict``: the ``quantization_config`` for every site to write
  (``floats``: the linears left in float); it refuses, with a ValueError naming the layer, any site
  the format cannot hold exactly. ``save_quantized`` calls it before it writes anything.
- ``checkpoint_tensors(site, config) -> {tensor name: tensor}``: one site's tensors, named under the
  site's module name; ``config`` is what ``checkpoint_config`` returned, for format-wide choices.

``register_format(name, writer)`` makes it a ``save_quantized(format=name)``; the methods package
registers the built-in formats when it is imported. Keeping the registry here lets ``loading/``
write any format without importing a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from pymllm_fx.layers.checkpoint_view import Quantized

_FORMATS: Dict[str, Any] = {}


def register_format(name: str, writer: Any) -> None:
    """Make ``writer`` write ``save_quantized(format=name)``; registering the same writer again is a no-op."""
    key = str(name).lower()
    for call in ("checkpoint_config", "checkpoint_tensors"):
        if not callable(getattr(writer, call, None)):
            raise TypeError(f"format {name!r}: {writer!r} has no {call}(); a writer needs checkpoint_config and "
                            f"checkpoint_tensors (see pymllm_fx/loading/formats.py)")
    if _FORMATS.get(key, writer) is not writer:
        raise ValueError(f"format {name!r} is already written by {_FORMATS[key]!r}; pick another name")
    _FORMATS[key] = writer


def format_names() -> Tuple[str, ...]:
    """Registered formats, in registration order."""
    return tuple(_FORMATS)


def format_writer(name: str) -> Any:
    key = str(name).lower()
    if key not in _FORMATS:
        raise ValueError(f"unknown checkpoint format {name!r}; use one of {', '.join(_FORMATS)}")
    return _FORMATS[key]


@dataclass
class Site:
    """One checkpoint module to write: a whole layer, or one shard of a merged layer."""

    name: str
    q: Quantized
    conv1d: bool = False
    expert: bool = False  # one expert's projection of an experts layer

    @property
    def n(self) -> int:
        return self.q.weight.shape[0]

    @property
    def k(self) -> int:
        return self.q.weight.shape[1]

    @property
    def group(self) -> int:
        """The int4 checkpoint group in inputs (the whole row for -1)."""
        return self.k if self.q.group_size == -1 else self.q.group_size

    @property
    def per_tensor(self) -> bool:
        """fp8: every row has the same scale (block scales never count: they change along K)."""
        return self.q.block_size is None and bool((self.q.scales == self.q.scales.reshape(-1)[0]).all())


def what(q: Quantized) -> str:
    """The layer as a refusal names it."""
    if q.kind == "int4":
        group = "per-channel" if q.group_size == -1 else f"group_size {q.group_size}"
        order = ", act-order" if q.g_idx is not None else ""
        return f"an int4 layer ({group}, {'symmetric' if q.zeros is None else 'asymmetric'}{order})"
    if q.kind == "int8":
        return "an int8 per-channel layer"
    if q.kind == "w8a8":
        acts = "static" if q.activation == "static" else "per-token dynamic"
        return f"a W8A8 int8 layer ({acts} int8 activations)"
    if q.block_size is not None:
        return f"an fp8 layer ({q.block_size[0]}x{q.block_size[1]} block weight scales)"
    if q.activation == "none":
        return f"an fp8 weight-only layer (per-{'tensor' if q.weight_strategy == 'tensor' else 'channel'} weight scale)"
    return f"an fp8 layer (per-{'tensor' if q.weight_strategy == 'tensor' else 'channel'} weight scale)"


def refuse(site: Site, fmt: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"{site.name}: cannot write {what(site.q)} as {fmt!r}: {problem}; {fix}")


def one_value(sites: List[Site], key: Callable[[Site], Any], fmt: str, what: str, fix: str) -> Optional[Any]:
    """The single value ``key(site)`` shared by every site; a format-wide setting cannot differ."""
    values: Dict[object, str] = {}
    for site in sites:
        values.setdefault(key(site), site.name)
    if len(values) > 1:
        found = ", ".join(f"{value} ({name})" for value, name in values.items())
        raise ValueError(f"cannot write {fmt!r}: it has one {what} for the whole model, but the layers have {found}; {fix}")
    return next(iter(values), None)
