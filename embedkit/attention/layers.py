"""Which layers the analysis reads: the ``attention.layers`` spec (checked before and after the model is
loaded) and its description in titles and the printed summary."""

from __future__ import annotations

import re

from omegaconf import ListConfig

from embedkit.errors import EmbedkitError


def check_layer_spec(spec) -> None:
    """Syntax check of ``attention.layers`` before the model is loaded (the range is checked after).

    Raises an ``EmbedkitError`` for a spec that cannot be read; returns None."""
    parse_layers(spec, None)


def parse_layers(spec, n_layers: int | None) -> list[int]:
    """``last`` | ``all`` | an index (0-based; negative counts from the end) | ``"a-b"`` (inclusive) | a list.

    Returns the sorted, distinct 0-based layer indices of a model with ``n_layers`` layers. With
    ``n_layers=None`` only the syntax is checked (returns [])."""
    if isinstance(spec, ListConfig):
        spec = list(spec)
    hint = "attention.layers must be last, all, a layer index (0-based, -1 = last), a range like 20-29, or a list"
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "last":
            spec = [-1]
        elif s == "all":
            return list(range(n_layers)) if n_layers else []
        elif re.fullmatch(r"-?\d+", s):
            spec = [int(s)]
        elif m := re.fullmatch(r"(\d+)\s*-\s*(\d+)", s):
            a, b = int(m.group(1)), int(m.group(2))
            if a > b:
                raise EmbedkitError(f"attention.layers={spec!r}: the range starts after it ends; write {b}-{a}")
            spec = list(range(a, b + 1))
        else:
            raise EmbedkitError(f"{hint}; got {spec!r}")
    elif isinstance(spec, bool) or spec is None:
        raise EmbedkitError(f"{hint}; got {spec!r}")
    elif isinstance(spec, int):
        spec = [spec]
    if not isinstance(spec, list) or not spec or not all(isinstance(x, int) and not isinstance(x, bool)
                                                         for x in spec):
        raise EmbedkitError(f"{hint}; got {spec!r}")
    if n_layers is None:
        return []
    out = []
    for x in spec:
        if not -n_layers <= x < n_layers:
            raise EmbedkitError(f"attention.layers: layer {x} does not exist; the model has {n_layers} layers "
                                f"(0 to {n_layers - 1}, or -1 for the last)")
        out.append(x % n_layers)
    return sorted(set(out))


def layer_description(layers: list[int], n_layers: int) -> str:
    """Words for the selected ``layers`` of a model with ``n_layers`` layers, e.g. ``layer 29 (last of 30)``
    or ``mean of layers 20-29 (of 0-29)``."""
    if layers == list(range(n_layers)):
        return f"mean of all {n_layers} layers"
    if len(layers) == 1:
        return f"layer {layers[0]}" + (f" (last of {n_layers})" if layers[0] == n_layers - 1 else f" of 0-{n_layers - 1}")
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"mean of layers {layers[0]}-{layers[-1]} (of 0-{n_layers - 1})"
    return f"mean of layers {','.join(map(str, layers))} (of 0-{n_layers - 1})"
