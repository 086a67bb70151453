"""Policies applied: which versions of a package clients may see and download, decided once per
document and policy revision, for every format alike.

Each registry has a `RegistryPolicy`, built by core from the installed `PolicyType`s. It asks the
policies about a package as a whole (its versions and their publish times), combines their
verdicts (`interfaces.VERDICT_ACTIONS`: exempt > block > allow > hide) into one `Decision` per
withheld version, and remembers the outcome as a `View`, keyed by the package and the document it
was made from (an upstream copy's content id, or a local package's revision stamp), valid while
the rules' revision is unchanged and until the earliest `Verdict.until`. A request that finds a
valid view pays a dictionary lookup.

What a view does:
- upstream documents: `batlehub.policy_documents.PolicedDocuments` hands formats the document
  without the withheld versions (its own content id, so every rendered form is cached apart);
- local packages: `visible_package` / `local_stamp` give the package without them and a stamp
  that says so, so ETags and rendered bytes differ too;
- downloads and version documents: `require_visible` refuses a withheld version with 403, the
  deciding rule and reason in the body and in `X-BatleHub-Policy`.

Every evaluation that withholds versions is counted (`PolicyStats`) and audited, at most once per
package and outcome per `HIDDEN_AUDIT_SECS`; every refusal is counted, and audited at most once per
version per `REFUSAL_AUDIT_SECS` (with the number of refusals in between).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from batlehub import audit
from batlehub.coordination import BackgroundWrites, LogThrottle
from batlehub.errors import Forbidden, NotFound, ServiceUnavailable
from batlehub.interfaces import (
    ALLOW,
    BLOCK,
    BLOCKED,
    EXEMPT,
    HIDDEN,
    HIDE,
    VERDICT_ACTIONS,
    VISIBLE,
    Policy,
    PolicySubject,
    Verdict,
)
from batlehub.policy_config import iso
from batlehub.policy_rules import RuleBook

if TYPE_CHECKING:
    from batlehub.db import Database
    from batlehub.package_model import Package
    from batlehub.packages import PackageStore
    from batlehub.policy_documents import PolicedDocuments

log = logging.getLogger(__name__)

VIEWS_MAX_ENTRIES = 20_000
"""Views a process remembers per registry (each a few hundred bytes, plus its withheld versions)."""
HIDDEN_AUDIT_SECS = 3600.0
REFUSAL_AUDIT_SECS = 60.0
POLICY_HEADER = "X-BatleHub-Policy"

_STATE_OF = {EXEMPT: VISIBLE, ALLOW: VISIBLE, BLOCK: BLOCKED, HIDE: HIDDEN}
_RANK = {action: rank for rank, action in enumerate(VERDICT_ACTIONS)}


@dataclass(frozen=True)
class Decision:
    """The outcome for one version: its state and the verdict that decided it."""

    state: str
    """`visible`, `hidden` or `blocked`."""
    rule: str
    reason: str
    policy: str

    def header(self) -> str:
        return f"{self.state}; rule={self.rule}"


@dataclass(frozen=True)
class View:
    """What a registry's policies withhold of one document (see the module docstring)."""

    revision: int
    valid_until: float
    withheld: Mapping[str, Decision]
    """Version -> decision, for every version that is not visible (and only those)."""
    digest: str
    """Short and stable for the set of withheld versions and their states; "" for none."""

    @property
    def hidden(self) -> tuple[str, ...]:
        return tuple(sorted(self.withheld))


def _digest(withheld: Mapping[str, Decision]) -> str:
    if not withheld:
        return ""
    text = "\n".join(f"{version}\0{withheld[version].state}" for version in sorted(withheld))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def combine(opinions: Sequence[tuple[str, Mapping[str, Verdict]]], versions: Any) -> tuple[dict[str, Decision], float]:
    """One decision per version that is not visible, and until when the opinions hold.

    `opinions`: (policy name, its verdicts) in the order the policies were asked; for each version
    the strongest action wins (`VERDICT_ACTIONS`), the first policy among equals."""
    winners: dict[str, tuple[str, Verdict]] = {}
    until = math.inf
    for policy, verdicts in opinions:
        for version, verdict in verdicts.items():
            if verdict.until is not None:
                until = min(until, verdict.until)
            if version not in versions or verdict.action not in _RANK:
                continue
            current = winners.get(version)
            if current is None or _RANK[verdict.action] < _RANK[current[1].action]:
                winners[version] = (policy, verdict)
    withheld = {
        version: Decision(_STATE_OF[verdict.action], verdict.rule, verdict.reason, policy)
        for version, (policy, verdict) in winners.items()
        if _STATE_OF[verdict.action] != VISIBLE
    }
    return withheld, until


class PolicyRefused(Forbidden):
    """A version withheld by a policy was asked for directly (a download, a version document)."""

    violation = False  # a lockfile naming a held-back version is no attack: never ban for it

    def __init__(self, registry: str, package: str, version: str, decision: Decision) -> None:
        word = "blocked" if decision.state == BLOCKED else "held back"
        super().__init__(
            f"{package}@{version} is {word} by the policy of registry {registry!r}"
            f" (rule {decision.rule}): {decision.reason}",
            headers={POLICY_HEADER: decision.header()},
        )
        self.decision = decision
        self.body: dict[str, Any] = {
            "policy": {
                "decision": decision.state,
                "rule": decision.rule,
                "reason": decision.reason,
                "policy": decision.policy,
                "package": package,
                "version": version,
            }
        }


class PolicyStats:
    """What the policies withheld and refused, for metrics: counters by (registry, state, rule kind)."""

    def __init__(self) -> None:
        self.withheld: Counter[tuple[str, str, str]] = Counter()
        """Versions withheld by evaluations (each evaluation of a package counts its versions)."""
        self.refused: Counter[tuple[str, str, str]] = Counter()
        """Requests for a withheld version that were refused (403)."""
        self.filtered_documents: Counter[str] = Counter()
        """Upstream documents handed out without some of their versions, by registry."""

    def snapshot(self) -> dict[str, Any]:
        def rows(counter: Counter[tuple[str, str, str]]) -> list[dict[str, Any]]:
            return [{"registry": r, "decision": s, "rule": k, "count": n} for (r, s, k), n in sorted(counter.items())]

        return {
            "withheld_versions": rows(self.withheld),
            "refused_requests": rows(self.refused),
            "filtered_documents": dict(sorted(self.filtered_documents.items())),
        }


def rule_kind(rule: str) -> str:
    """`block/3f9a…` -> `block`, `release-age:@corp` -> `release-age`: a label with few values."""
    return rule.split("/", 1)[0].split(":", 1)[0]


class RegistryPolicy:
    """The policies of one registry, applied (see the module docstring)."""

    def __init__(
        self,
        *,
        registry: str,
        format_name: str,
        scope_of: Callable[[str], str | None] | None,
        policies: Sequence[Policy],
        rules: RuleBook | None,
        packages: PackageStore,
        db: Database,
        stats: PolicyStats | None = None,
    ) -> None:
        self.registry = registry
        self.format_name = format_name
        self.scope_of = scope_of or (lambda name: None)
        self.policies = list(policies)
        self.rules = rules
        self.packages = packages
        self.db = db
        self.stats = stats or PolicyStats()
        self.documents: PolicedDocuments | None = None
        """Set by core when the registry proxies upstreams (`RegistryServices.upstream_documents`)."""
        self.writes = BackgroundWrites()
        self._timed = any(p.needs_times for p in self.policies)
        self._views: OrderedDict[tuple[str, str, bool], View] = OrderedDict()
        self._hidden_audits = LogThrottle(HIDDEN_AUDIT_SECS)
        self._refusal_audits = LogThrottle(REFUSAL_AUDIT_SECS)

    @property
    def active(self) -> bool:
        return bool(self.policies)

    async def revision(self) -> int:
        return await self.rules.revision() if self.rules is not None else 0

    def _concerned(self, package: str, local: bool) -> list[Policy]:
        return [p for p in self.policies if p.concerns(package, local)]

    async def needs_times(self, package: str) -> bool:
        """Whether deciding about an upstream package needs its versions' publish times."""
        if not self._timed:
            return False
        await self.revision()
        return any(p.needs_times and p.concerns(package, False) for p in self.policies)

    # --- views --------------------------------------------------------------------------------

    async def view(
        self, package: str, source_id: str, local: bool, versions: Callable[[], Awaitable[Mapping[str, float | None]]]
    ) -> View:
        """The view of `package` as of the document `source_id`; `versions()` reads the versions
        and their times, called only when the view must be made anew."""
        if not self.policies:
            return _EMPTY
        revision = await self.revision()
        now = time.time()
        key = (package, source_id, local)
        found = self._views.get(key)
        if found is not None and found.revision == revision and now < found.valid_until:
            self._views.move_to_end(key)
            return found
        concerned = self._concerned(package, local)
        if not concerned:
            made = View(revision, math.inf, {}, "")
        else:
            subject = PolicySubject(
                registry=self.registry,
                format=self.format_name,
                package=package,
                scope=self.scope_of(package),
                local=local,
                versions=await versions(),
                now=now,
            )
            withheld, until = combine(await self._opinions(concerned, subject), subject.versions)
            made = View(revision, until, withheld, _digest(withheld))
            if withheld:
                self._account(package, made)
        self._views[key] = made
        if len(self._views) > VIEWS_MAX_ENTRIES:
            self._views.popitem(last=False)
        return made

    async def _opinions(
        self, policies: Sequence[Policy], subject: PolicySubject
    ) -> list[tuple[str, Mapping[str, Verdict]]]:
        opinions = []
        for policy in policies:
            try:
                verdicts = policy.decide(subject)
                if inspect.isawaitable(verdicts):
                    verdicts = await verdicts
            except Exception:
                # Failing open would let every version through while a policy is broken.
                log.exception("registry %s: policy %s failed on %s", self.registry, policy.name, subject.package)
                raise ServiceUnavailable(
                    f"the policy {policy.name!r} of registry {self.registry!r} could not decide about"
                    f" {subject.package}; details are in the server log"
                ) from None
            opinions.append((policy.name, verdicts))
        return opinions

    def _account(self, package: str, view: View) -> None:
        for decision in view.withheld.values():
            self.stats.withheld[(self.registry, decision.state, rule_kind(decision.rule))] += 1
        suppressed = self._hidden_audits.admit(f"{package}\0{view.digest}")
        if suppressed is None:
            return
        listed = sorted(view.withheld.items())
        detail = {
            "withheld": {v: {"decision": d.state, "rule": d.rule} for v, d in listed[:50]},
            "count": len(listed),
        }
        self.writes.spawn(self._audit("policy.withheld", package, detail))

    async def _audit(self, action: str, target: str, detail: Any, actor: Any = None) -> None:
        try:
            await audit.record(
                self.db,
                action,
                registry=self.registry,
                user_id=getattr(actor, "user_id", None),
                target=target[:500],
                client_ip=getattr(actor, "client_ip", None),
                result="denied",
                detail=detail,
            )
        except Exception:
            log.warning("could not write %s of %s to the audit log", action, target, exc_info=True)

    # --- local packages -----------------------------------------------------------------------

    async def local_view(self, name: str, stamp: str) -> View:
        return await self.view(name, stamp, True, lambda: self.packages.version_times(name))

    async def local_stamp(self, name: str, stamp: str) -> str:
        """`stamp` (the package's revision stamp) extended by what the policies withhold, if
        anything: key rendered bytes and ETags by it, as by the stamp itself."""
        view = await self.local_view(name, stamp)
        return f"{stamp}~{view.digest}" if view.digest else stamp

    async def visible_package(self, package: Package) -> Package:
        """`package` as clients may see it: without withheld versions and the tags on them."""
        facts = {v.version: v.created for v in package.versions}

        async def versions() -> Mapping[str, float | None]:
            return facts

        view = await self.view(package.name, package.stamp, True, versions)
        if not view.withheld:
            return package
        return replace(
            package,
            versions=tuple(v for v in package.versions if v.version not in view.withheld),
            tags={tag: v for tag, v in package.tags.items() if v not in view.withheld},
            view=view.digest,
        )

    # --- one version --------------------------------------------------------------------------

    async def decision(self, name: str, version: str) -> Decision | None:
        """Why `name@version` is withheld, or None when clients may have it (or the policies do
        not know the version: the format then answers as for any unknown version)."""
        if not self.policies:
            return None
        await self.revision()
        if not self._concerned(name, True) and not self._concerned(name, False):
            return None  # no policy has an opinion on this package: nothing to read
        stamp = await self.packages.stamp(name)
        if stamp is not None:
            return (await self.local_view(name, stamp)).withheld.get(version)
        if self.documents is None:
            return None
        doc = await self.documents.source(name)
        if doc is None:
            return None
        view = await self.documents.view_of(doc)
        return view.withheld.get(version)

    async def require_visible(self, name: str, version: str, actor: Any = None) -> None:
        """Raise `PolicyRefused` (403) when `name@version` is withheld: call it before serving a
        version's artifact or document. `actor` (`batlehub.api.actor(request)`) goes to the
        audit entry."""
        found = await self.decision(name, version)
        if found is None:
            return
        self.stats.refused[(self.registry, found.state, rule_kind(found.rule))] += 1
        target = f"{name}@{version}"
        suppressed = self._refusal_audits.admit(target)
        if suppressed is not None:
            detail: dict[str, Any] = {"decision": found.state, "rule": found.rule, "reason": found.reason}
            if suppressed:
                detail["refused_since_last_entry"] = suppressed
            self.writes.spawn(self._audit("policy.refused", target, detail, actor))
        raise PolicyRefused(self.registry, name, version, found)

    async def explain(self, name: str, version: str) -> dict[str, Any]:
        """Which rule decides `name@version`, and what every policy said (the why endpoint)."""
        stamp = await self.packages.stamp(name)
        local = stamp is not None
        if local:
            versions: Mapping[str, float | None] = await self.packages.version_times(name)
        elif self.documents is not None and (doc := await self.documents.source(name)) is not None:
            versions = await self.documents.facts(doc)
        else:
            raise NotFound(f"package {name} not found in registry {self.registry!r}")
        if version not in versions:
            raise NotFound(f"{name} has no version {version} in registry {self.registry!r}")
        await self.revision()
        now = time.time()
        subject = PolicySubject(
            registry=self.registry,
            format=self.format_name,
            package=name,
            scope=self.scope_of(name),
            local=local,
            versions=versions,
            now=now,
        )
        concerned = self._concerned(name, local)
        opinions = await self._opinions(concerned, subject)
        withheld, until = combine(opinions, versions)
        said = [
            {"policy": policy, "action": v.action, "rule": v.rule, "reason": v.reason, "until": iso(v.until)}
            for policy, verdicts in opinions
            if (v := verdicts.get(version)) is not None
        ]
        decided = withheld.get(version)
        if decided is None and said:
            best = min(said, key=lambda s: _RANK.get(str(s["action"]), 99))
            decided = Decision(VISIBLE, str(best["rule"]), str(best["reason"]), str(best["policy"]))
        return {
            "registry": self.registry,
            "package": name,
            "version": version,
            "source": "local" if local else "upstream",
            "published": iso(versions[version]),
            "decision": decided.state if decided else VISIBLE,
            "rule": decided.rule if decided else None,
            "reason": decided.reason if decided else "no policy has an opinion on this version",
            "policy": decided.policy if decided else None,
            "until": iso(until) if math.isfinite(until) else None,
            "policies": [p.name for p in self.policies],
            "opinions": said,
        }

    async def settle(self) -> None:
        await self.writes.settle()


_EMPTY = View(0, math.inf, {}, "")
