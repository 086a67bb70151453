"""Upstream documents as a registry's policies let clients see them.

`PolicedDocuments` is the `UpstreamDocuments` that core hands every format: `get` answers with
the upstream's document, or, when the policies withhold some of its versions, with a view of it
without them (the format's pure `DocumentFormat.without`). A view is an `UpstreamDocument` like
any other, with its own content id (the upstream copy's plus a digest of what is withheld), so
everything a format derives from it, by `extract` or by rendering keyed on the content id, is
derived once per view and never mixed with the unfiltered document's.

The view's bytes are made only when something must be derived anew (a rendered form evicted, a new
`extract`), once for concurrent callers, in a worker process for big documents, and kept within a
byte budget: a request that finds its rendered bytes pays one dictionary lookup for the view,
nothing per version, and no copy of the document.

A registry whose policies need publish times asks for `DocumentFormat.timed_variant` (npm's full
packument) in place of the variant the client asked for, which the format renders as usual.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from batlehub.coordination import SingleFlight
from batlehub.policies import RegistryPolicy, View
from batlehub.upstream import UpstreamDocument, UpstreamDocuments

log = logging.getLogger(__name__)

HANDED_MAX_ENTRIES = 4096
VIEW_BYTES_SHARE = 4
"""Views' bytes may take 1/this of the upstream bodies' memory budget; a bigger view is made
again when needed rather than pushing out all the others."""


class PolicedDocuments(UpstreamDocuments):
    """See the module docstring. Built by `RegistryServices.upstream_documents`."""

    def __init__(self, *, policy: RegistryPolicy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.policy = policy
        self._views: OrderedDict[str, bytes] = OrderedDict()
        self._view_bytes = 0
        self._making = SingleFlight()
        self._handed: dict[str, UpstreamDocument] = {}
        if self.format.versions is None and any(p.needs_times for p in policy.policies):
            log.warning(
                "registry %s: its format tells no publish times of upstream versions, so its"
                " min_release_age cannot hold upstream versions back",
                self.registry,
            )

    async def source(
        self, name: str, variant: str | None = None, *, revalidate: bool = False
    ) -> UpstreamDocument | None:
        """The upstream's document as stored, unfiltered: in the variant that carries publish
        times when the policies need them."""
        timed = self.format.timed_variant
        if timed is not None and variant != timed and await self.policy.needs_times(name):
            variant = timed
        return await super().get(name, variant, revalidate=revalidate)

    async def facts(self, doc: UpstreamDocument) -> dict[str, float | None]:
        """Versions and publish times of an upstream copy (once per content id)."""
        if self.format.versions is None:
            return {}
        return await super().extract(doc, self.format.versions)

    async def view_of(self, doc: UpstreamDocument) -> View:
        return await self.policy.view(doc.name, doc.content_id, False, lambda: self.facts(doc))

    async def get(self, name: str, variant: str | None = None, *, revalidate: bool = False) -> UpstreamDocument | None:
        doc = await self.source(name, variant, revalidate=revalidate)
        if doc is None or not self.policy.active or self.format.without is None:
            return doc
        view = await self.view_of(doc)
        if not view.withheld:
            return doc
        self.policy.stats.filtered_documents[self.registry] += 1
        # The same view is handed out on every request until the copy or the view changes.
        made = self._handed.get(doc.content_id)
        if made is None or made.content_id[-len(view.digest) :] != view.digest or _changed(made, doc):
            made = replace(
                doc,
                body=None,
                content_id=f"{doc.content_id}~{view.digest}",
                withheld=view.hidden,
                source_id=doc.content_id,
            )
            if len(self._handed) >= HANDED_MAX_ENTRIES:
                self._handed.clear()
            self._handed[doc.content_id] = made
        return made

    async def read(self, doc: UpstreamDocument) -> bytes:
        if not doc.withheld:
            return await super().read(doc)
        if doc.body is not None:
            return doc.body
        found = self._views.get(doc.content_id)
        if found is not None:
            self._views.move_to_end(doc.content_id)
            return found

        async def make() -> bytes:
            without = self.format.without
            assert without is not None
            source = replace(doc, content_id=doc.source_id, withheld=(), source_id="", body=None)
            body = await super(PolicedDocuments, self).read(source)
            made = await self.offload.run(len(body), without, body, doc.withheld)
            self._keep(doc.content_id, made)
            return made

        return await self._making.run(doc.content_id, make)

    def _keep(self, content_id: str, body: bytes) -> None:
        budget = self.memo_max_bytes // VIEW_BYTES_SHARE
        if len(body) * 4 > budget:
            return
        old = self._views.pop(content_id, None)
        if old is not None:
            self._view_bytes -= len(old)
        self._views[content_id] = body
        self._view_bytes += len(body)
        while self._views and self._view_bytes > budget:
            _, dropped = self._views.popitem(last=False)
            self._view_bytes -= len(dropped)


def _changed(view: UpstreamDocument, source: UpstreamDocument) -> bool:
    """Whether the copy was renewed or went stale since `view` was made of it."""
    return view.fetched_at != source.fetched_at or view.stale != source.stale or view.name != source.name
