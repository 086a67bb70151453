"""Block and allow lists and exemptions, a built-in policy (hook `register_policies`, kind
`lists`).

The rules live in core (`batlehub.policy_rules`: the admin API and `[registries.policy]`); this
policy turns those that name a package into verdicts: a block rule blocks the versions in its
range, an allow rule lifts other policies' hides (not blocks), an exemption lifts everything, each
until it expires. Which verdict wins when several policies speak is core's rule
(`interfaces.VERDICT_ACTIONS`).
"""

from __future__ import annotations

from collections.abc import Mapping

from batlehub.interfaces import PolicySetup, PolicySubject, PolicyType, Verdict
from batlehub.plugins import hookimpl
from batlehub.policy_config import iso

RULE = "lists"

_VERBS = {"block": "blocked", "allow": "allowed", "exempt": "exempted"}
_STRENGTH = {"exempt": 0, "block": 1, "allow": 2}
_REASON = "{verb} by rule {rule.rule_id} ({rule.package}@{rule.versions}, set by {rule.author}{until}): {rule.reason}"


class ListsPolicy:
    """The rules of one registry, as verdicts."""

    name = RULE
    needs_times = False

    def __init__(self, setup: PolicySetup) -> None:
        self.rules = setup.rules

    def concerns(self, package: str, local: bool) -> bool:
        return bool(self.rules) and bool(self.rules.matching(package))

    def decide(self, subject: PolicySubject) -> Mapping[str, Verdict]:
        out: dict[str, Verdict] = {}
        for matcher in self.rules.matching(subject.package):
            rule = matcher.rule
            if not rule.in_force(subject.now):
                continue
            until = f" until {iso(rule.expires)}" if rule.expires is not None else ""
            reason = _REASON.format(verb=_VERBS[rule.kind], rule=rule, until=until)
            strength = _STRENGTH[rule.kind]
            for version in subject.versions:
                if not (matcher.every_version or matcher.versions(version)):
                    continue
                current = out.get(version)
                # The strongest kind for each version; among equals, the oldest rule names it.
                if current is None or strength < _STRENGTH[current.action]:
                    out[version] = Verdict(rule.kind, rule.rule_id, reason, until=rule.expires)
        return out


def build(setup: PolicySetup) -> ListsPolicy:
    return ListsPolicy(setup)


@hookimpl
def register_policies() -> list[PolicyType]:
    return [
        PolicyType(
            name=RULE,
            description="block and allow lists and exemptions: the admin API's and [registries.policy]'s rules",
            factory=build,
        )
    ]
