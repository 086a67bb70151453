"""The `[registries.policy]` table, and the words rules are written in: durations, expiry times,
package patterns and version ranges.

The same checks serve the configuration (reported by key path, all at once, by `batlehub
check-config`) and the admin API (a 400 naming the field), so a rule that one accepts the other
accepts too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from batlehub.configmodel import ConfigList, ConfigModel

MAX_PATTERN = 214
"""npm's own limit on a name; no format's names are longer in practice."""
MAX_RANGE = 256
"""Ranges are parsed with regular expressions: keep what an admin may send short."""
MAX_REASON = 500

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([wdhms])")
_UNIT_SECS = {"w": 604800.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(value: Any) -> float:
    """Seconds, from a number of seconds or text such as "3d", "12h", "1d12h", "90m", "0"."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as "3d", "12h" or a number of seconds')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text in ("0", ""):
            return 0.0
        parts = _DURATION.findall(text)
        if not parts or _DURATION.sub("", text).strip():
            raise ValueError(f'expected a duration such as "3d", "12h", "1d12h" or "30m", got {value!r}')
        seconds = sum(float(number) * _UNIT_SECS[unit] for number, unit in parts)
    else:
        raise ValueError(f'expected a duration such as "3d" or a number of seconds, got {value!r}')
    if not math.isfinite(seconds) or seconds < 0 or seconds > 100 * 365 * 86400:
        raise ValueError(f"expected a duration between 0 and 100 years, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds as the configuration writes them: "3d", "1d12h", "45m"."""
    left, out = round(seconds), list[str]()
    for unit in ("d", "h", "m", "s"):
        size = int(_UNIT_SECS[unit])
        if left >= size or (unit == "s" and not out):
            count, left = divmod(left, size)
            if count or unit == "s":
                out.append(f"{count}{unit}")
    return "".join(out)


def parse_time(value: Any) -> float:
    """Epoch seconds, from epoch seconds, an ISO 8601 text (`2027-01-31`, `2027-01-31T12:00:00Z`;
    UTC when no zone is given) or a TOML date or date-time."""
    if isinstance(value, bool):
        raise ValueError("expected an ISO 8601 time or epoch seconds")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expected an ISO 8601 time or epoch seconds, got {value!r}")
        return float(value)
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"expected an ISO 8601 time such as 2027-01-31T12:00:00Z, got {value!r}") from None
    else:
        raise ValueError(f"expected an ISO 8601 time or epoch seconds, got {value!r}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# --- package patterns and version ranges -----------------------------------------------------------


def check_pattern(pattern: Any, normalize: Callable[[str], str] | None = None) -> str:
    """A package pattern as rules keep it: an exact name, a scope (`@corp`: every name in it), or
    a glob with `*` and `?` matched against names as the format stores them (`@corp/*`, `*-cli`).
    Exact names and scopes go through the format's `normalize_name` (which raises `BadRequest`)."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError('expected a package name, a scope such as "@corp", or a pattern such as "@corp/*"')
    pattern = pattern.strip()
    if len(pattern) > MAX_PATTERN or not pattern.isprintable() or any(c.isspace() for c in pattern):
        raise ValueError(f"expected at most {MAX_PATTERN} printable characters without spaces")
    if not is_glob(pattern) and normalize is not None:
        return normalize(pattern)
    return pattern


def is_glob(pattern: str) -> bool:
    return "*" in pattern or "?" in pattern


def name_matcher(pattern: str, scope_of: Callable[[str], str | None] | None) -> Callable[[str], bool]:
    """A test of package names for `pattern` (see `check_pattern`)."""
    if is_glob(pattern):
        regex = re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern))
        return lambda name: regex.fullmatch(name) is not None
    scope = scope_of or (lambda name: None)
    return lambda name: name == pattern or scope(name) == pattern


def semver_range(text: str) -> Callable[[str], bool]:
    """npm's range syntax (`1.2.3`, `>=1.2.0 <1.3.0`, `^2`, `1.x || 3.1.4`) as a test of versions,
    by node-semver's rules, except that prereleases inside the range match too: a rule about
    `>=1.2.0 <2` is meant for `1.5.0-beta.1` as much as for `1.5.0`. A version that is not semver
    matches no range."""
    import nodesemver

    try:
        parsed = nodesemver.make_range(text, False)
    except (ValueError, TypeError):
        raise ValueError(f"not a semver range: {text!r}") from None
    if parsed is None:
        raise ValueError(f"not a semver range: {text!r}")

    def test(version: str) -> bool:
        try:
            return bool(parsed.test(version, include_prerelease=True))
        except (ValueError, TypeError):
            return False

    return test


def version_matcher(text: str, version_range: Callable[[str], Callable[[str], bool]] | None) -> Callable[[str], bool]:
    """A test of versions for a rule's `versions`: `*` (every version, whatever its syntax), the
    format's range syntax, or without one exact versions separated by `||`."""
    text = text.strip()
    if text in ("", "*"):
        return lambda version: True
    if version_range is None:
        exact = {part.strip() for part in text.split("||") if part.strip()}
        return exact.__contains__
    return version_range(text)


def check_range(text: Any, version_range: Callable[[str], Callable[[str], bool]] | None) -> str:
    if not isinstance(text, str):
        raise ValueError('expected a version range such as ">=1.2.0 <1.3.0", or "*"')
    text = text.strip() or "*"
    if len(text) > MAX_RANGE or not text.isprintable():
        raise ValueError(f"expected a version range of at most {MAX_RANGE} printable characters")
    version_matcher(text, version_range)  # raises ValueError for a bad one
    return text


# --- [registries.policy] ---------------------------------------------------------------------------

Duration = Annotated[float, BeforeValidator(parse_duration)]
Moment = Annotated[float, BeforeValidator(parse_time)]


class AgeOverride(ConfigModel):
    """A `min_release_age` for some packages only (`[[registries.policy.age]]`)."""

    package: str = Field(examples=["@corp"])
    """A name, a scope (`@corp`) or a pattern (`@corp/*`, `*-internal`)."""
    min_release_age: Duration = Field(examples=["7d"])


class ConfigRule(ConfigModel):
    """A block or allow rule written in the configuration (`[[registries.policy.block]]`)."""

    package: str = Field(examples=["event-stream"])
    versions: str = "*"
    """A range in the format's syntax (npm: `>=3.3.6 <3.3.7`), or `*` for every version."""
    reason: str = Field(min_length=1, max_length=MAX_REASON, examples=["compromised release"])
    expires: Moment | None = None


class PolicyConfig(ConfigModel):
    """`[registries.policy]`: the release-age gate and the rules kept in the configuration."""

    min_release_age: Duration = 0.0
    """Upstream versions younger than this (by the upstream's publish time) are hidden."""
    missing_time: Literal["hide", "allow"] = "hide"
    """What the gate does with a version whose document gives no usable publish time."""
    gate_local: bool = False
    """Also hold back versions published here (by the time of their publish)."""
    age: ConfigList[AgeOverride] = ()
    """Per name, scope or pattern; the first that matches a package wins over `min_release_age`."""
    block: ConfigList[ConfigRule] = ()
    allow: ConfigList[ConfigRule] = ()
