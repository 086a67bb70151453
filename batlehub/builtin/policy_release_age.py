"""The release-age gate, a built-in policy (hook `register_policies`, kind `release-age`).

Hijacked releases are usually found and pulled within hours or days; holding new versions back
for a while keeps them away from installs until then. The age is the upstream registry's publish
time of the version (npm `time`, PyPI `upload-time`), never the moment this hub first saw it: a
hub that starts mirroring a package today must not treat its ten-year-old versions as new, nor a
version published a minute ago as old because it was cached before. A version whose document gives
no usable time is hidden (`missing_time = "hide"`), since "unknown" must not mean "old enough".

Configured per registry in `[registries.policy]`: `min_release_age`, per name, scope or pattern in
`[[registries.policy.age]]` (the first that matches wins), `missing_time`, and `gate_local` for
packages published here (not gated by default: their publishers are this hub's own users).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from batlehub.interfaces import HIDE, PolicySetup, PolicySubject, PolicyType, Verdict
from batlehub.plugins import hookimpl
from batlehub.policy_config import PolicyConfig, check_pattern, format_duration, iso, name_matcher

RULE = "release-age"


class ReleaseAgeGate:
    """The gate of one registry."""

    name = RULE
    needs_times = True

    def __init__(
        self, config: PolicyConfig, scope_of: Callable[[str], str | None] | None, normalize: Callable[[str], str] | None
    ) -> None:
        self.config = config
        self.overrides = [
            (
                override.package,
                name_matcher(check_pattern(override.package, normalize), scope_of),
                override.min_release_age,
            )
            for override in config.age
        ]
        self._ages: dict[str, tuple[float, str]] = {}

    def age_for(self, package: str) -> tuple[float, str]:
        """The minimum age for `package` and the rule that sets it."""
        found = self._ages.get(package)
        if found is None:
            found = (self.config.min_release_age, RULE)
            for pattern, matches, age in self.overrides:
                if matches(package):
                    found = (age, f"{RULE}:{pattern}")
                    break
            if len(self._ages) > 100_000:
                self._ages.clear()
            self._ages[package] = found
        return found

    def concerns(self, package: str, local: bool) -> bool:
        return (self.config.gate_local or not local) and self.age_for(package)[0] > 0

    def decide(self, subject: PolicySubject) -> Mapping[str, Verdict]:
        age, rule = self.age_for(subject.package)
        if age <= 0:
            return {}
        wanted = format_duration(age)
        hide_unknown = self.config.missing_time == "hide"
        out: dict[str, Verdict] = {}
        for version, published in subject.versions.items():
            if published is None:
                if hide_unknown:
                    out[version] = Verdict(
                        HIDE,
                        rule,
                        f"{subject.package}@{version} has no publish time, so its age is unknown"
                        f' (min_release_age {wanted}; missing_time = "hide")',
                    )
                continue
            ready = published + age
            if ready > subject.now:
                out[version] = Verdict(
                    HIDE,
                    rule,
                    f"{subject.package}@{version} was published {format_duration(max(0.0, subject.now - published))}"
                    f" ago, at {iso(published)}; min_release_age is {wanted}, so it is held back until {iso(ready)}",
                    until=ready,
                )
        return out


def build(setup: PolicySetup) -> ReleaseAgeGate | None:
    config = setup.registry.policy
    if config is None or (config.min_release_age <= 0 and not any(o.min_release_age > 0 for o in config.age)):
        return None
    return ReleaseAgeGate(config, setup.format.scope_of, setup.format.normalize_name)


@hookimpl
def register_policies() -> list[PolicyType]:
    return [
        PolicyType(
            name=RULE,
            description="holds back versions younger than [registries.policy] min_release_age (upstream publish time)",
            factory=build,
        )
    ]
