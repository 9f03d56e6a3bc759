"""Per-sample generating factors carried by a shard set (the ground truth of the properties eval).

Format (``selfsup-shards/1``; any shard set may carry it, whoever wrote it):

* The manifest has a ``"factors"`` list, one entry per factor, in a fixed order::

      "factors": [
        {"name": "shape", "kind": "discrete", "values": ["circle", "square", ...]},
        {"name": "x", "kind": "continuous", "low": 0.3, "high": 0.7},
        {"name": "rotation", "kind": "continuous", "low": 0.0, "high": 6.283185, "period": 6.283185}
      ]

  ``name`` (unique) and ``kind`` (``discrete`` or ``continuous``) are required. A discrete factor
  may list ``values`` (names of the integer codes 0..K-1; codes must then lie in that range); a
  continuous one may give its ``low``/``high`` range and a ``period`` when it is circular (an
  angle, a hue). These are documentation for readers; only ``name``, ``kind`` and ``values`` are
  checked.
* Every sample has a member ``<key>.factors.json`` beside its image and ``.cls``: a JSON array of
  numbers, one per manifest factor, in manifest order, e.g. ``[2, 0.41, 0.55, 0.62]``. Discrete
  values are integers; every value is finite; ``true``/``false``, strings and ``null`` are errors.

Write one from Python with ``write_shards(samples, out, classes, opts, factors=specs)`` where each
``Sample`` has ``factors`` (a sequence of F numbers), or with ``ArraySource(..., factors=[N, F]
array, factor_specs=specs)``; ``selfsup shards --source shapes`` records the shapes' own factors.
Read them back with ``load_factors(ShardSet.open(dir))`` (an ``[N, F]`` float64 array in manifest
order, which a caller checks by comparing the keys). A set without factors, a factor list of the
wrong length, or a value of the wrong type raises ``FactorError`` naming the field or the sample.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FACTORS_EXT = "factors.json"
KINDS = ("discrete", "continuous")


class FactorError(ValueError):
    """A shard set has no factors, or a factor spec or a sample's factor values are malformed."""


@dataclass(frozen=True)
class FactorSpec:
    name: str
    kind: str  # discrete | continuous
    values: tuple[str, ...] = ()  # discrete: names of codes 0..K-1 (optional)
    low: float | None = None  # continuous: documented range (optional)
    high: float | None = None
    period: float | None = None  # continuous and circular: the period (2π for an angle)

    @property
    def discrete(self) -> bool:
        return self.kind == "discrete"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.values:
            out["values"] = list(self.values)
        for k in ("low", "high", "period"):
            if getattr(self, k) is not None:
                out[k] = float(getattr(self, k))
        return out

    @classmethod
    def from_json(cls, d: Any, where: str = "factors") -> FactorSpec:
        if isinstance(d, FactorSpec):
            return d
        if not isinstance(d, dict):
            raise FactorError(f"{where}: each factor must be an object with name and kind, got {d!r}")
        unknown = set(d) - {"name", "kind", "values", "low", "high", "period"}
        if unknown:
            raise FactorError(f"{where}: unknown key(s) {sorted(unknown)} in factor {d.get('name')!r}")
        name, kind = d.get("name"), d.get("kind")
        if not isinstance(name, str) or not name:
            raise FactorError(f"{where}: factor 'name' must be a non-empty string, got {name!r}")
        if kind not in KINDS:
            raise FactorError(f"{where}: factor {name!r} has 'kind' {kind!r}; expected one of {KINDS}")
        values = d.get("values") or ()
        if values and (kind != "discrete" or not all(isinstance(v, str) for v in values)):
            raise FactorError(f"{where}: factor {name!r}: 'values' is a list of names of a discrete factor")
        nums = {}
        for k in ("low", "high", "period"):
            v = d.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise FactorError(f"{where}: factor {name!r}: {k!r} must be a number, got {v!r}")
            nums[k] = None if v is None else float(v)
        return cls(name, kind, tuple(values), **nums)


def check_specs(specs: Sequence[FactorSpec | dict], where: str = "factors") -> list[FactorSpec]:
    """Specs as ``FactorSpec`` objects; names must be unique and the list non-empty."""
    if isinstance(specs, (str, bytes)) or not isinstance(specs, Sequence) or not specs:
        raise FactorError(f"{where}: expected a non-empty list of factors, got {specs!r}")
    out = [FactorSpec.from_json(s, where) for s in specs]
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise FactorError(f"{where}: duplicate factor name(s) {dup}")
    return out


def check_values(values: Any, specs: Sequence[FactorSpec], key: str) -> list[float | int]:
    """One sample's factor values, checked against ``specs``; errors name the sample ``key``."""
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if values is None:
        raise FactorError(f"sample {key!r}: no factors (the set declares {[s.name for s in specs]})")
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Sequence):
        raise FactorError(f"sample {key!r}: factors must be a list of numbers, got {type(values).__name__}")
    if len(values) != len(specs):
        raise FactorError(
            f"sample {key!r}: {len(values)} factor value(s), the set declares {len(specs)} "
            f"({', '.join(s.name for s in specs)})"
        )
    out: list[float | int] = []
    for v, s in zip(values, specs, strict=True):
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise FactorError(f"sample {key!r}: factor {s.name!r} must be a finite number, got {v!r}")
        if s.discrete:
            if float(v) != int(v):
                raise FactorError(f"sample {key!r}: discrete factor {s.name!r} must be an integer, got {v!r}")
            v = int(v)
            if s.values and not 0 <= v < len(s.values):
                raise FactorError(
                    f"sample {key!r}: factor {s.name!r} = {v} is outside its {len(s.values)} values"
                )
        out.append(v if s.discrete else float(v))
    return out


def encode_factors(values: Any, specs: Sequence[FactorSpec], key: str) -> bytes:
    """The ``<key>.factors.json`` payload of one sample."""
    return json.dumps(check_values(values, specs, key)).encode()


def factor_specs(manifest: dict, where: str = "shard set") -> list[FactorSpec]:
    """The factor specs a manifest declares; a clear error when it declares none."""
    if "factors" not in manifest:
        raise FactorError(
            f"{where}: the manifest has no 'factors' field, so its samples carry no generating "
            "factors (write the set with 'selfsup shards --source shapes', or add factors: see "
            "selfsup.pretrain.data.factors)"
        )
    return check_specs(manifest["factors"], f"{where}: manifest 'factors'")


def load_factors(shardset: Any) -> tuple[np.ndarray, list[str]]:  # shardset: a stream.ShardSet
    """Every sample's factors in manifest order (the order of ``load_arrays``): ``([N, F], keys)``.

    Reads only the ``.factors.json`` members; any missing or malformed entry is an error naming
    the sample and its shard file.
    """
    import webdataset as wds

    specs = factor_specs(shardset.manifest, shardset.base)
    rows: list[list] = []
    keys: list[str] = []
    for url, count in zip(shardset.urls, shardset.counts, strict=True):
        n = 0
        for sample in wds.tariterators.tarfile_samples([{"url": url}]):
            key = sample["__key__"]
            if FACTORS_EXT not in sample:
                raise FactorError(
                    f"sample {key!r} in {url} has no {FACTORS_EXT} member (the manifest declares "
                    f"factors {[s.name for s in specs]})"
                )
            try:
                rows.append(check_values(json.loads(sample[FACTORS_EXT]), specs, key))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise FactorError(f"sample {key!r} in {url}: {FACTORS_EXT} is not JSON ({e})") from e
            except FactorError as e:
                raise FactorError(f"{e} (in {url})") from e
            keys.append(key)
            n += 1
        if n != count:
            raise FactorError(f"{url}: {n} samples with factors, the manifest says {count}")
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(specs)), keys

