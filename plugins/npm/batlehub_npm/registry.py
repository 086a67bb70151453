"""One npm registry under `/registries/{name}/`: routing, the npm documents and the three modes.

- `proxy`: read-only cache of the upstream registries; writes are refused.
- `local`: only packages published here; unknown names are 404.
- `hybrid`: a name that exists locally is served from local data only (never merged with the
  upstream's versions, so nobody can slip a version in from outside); other names are proxied.

Requests are dispatched on the raw path by `names.parse_route`, because scoped names arrive both
as `@scope%2fname` and `@scope/name` and the router would see them decoded. Permissions are
checked here for a fast refusal and again by core on every write, with ownership.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from functools import partial
from typing import Any
from urllib.parse import quote

from aiohttp import web

from batlehub.api import (
    BadRequest,
    BatleHubError,
    Conflict,
    MethodNotAllowed,
    NotFound,
    PackagePage,
    PayloadTooLarge,
    RegistryServices,
    RegistrySettings,
    Rendered,
    UnprocessableEntity,
    UpstreamDocument,
    actor,
    banner_header,
    base_url,
    body_reader,
    etag_matches,
    label_route,
    parse_json,
    read_json,
    registry_path,
    registry_subpath,
    registry_url,
    require,
    respond,
    revision_etag,
    route_handler,
)
from batlehub_npm import accounts, documents, page
from batlehub_npm.documents import json_response
from batlehub_npm.integrity import expected_digests
from batlehub_npm.local import LocalPackages
from batlehub_npm.names import PackageName, Route, parse_package_name, parse_route, validate_version
from batlehub_npm.options import NpmOptions
from batlehub_npm.publish import TarballSink, max_body_bytes, parse_document, parse_publish, single_manifest
from batlehub_npm.upstream import UpstreamProxy

VARY = "Accept, Accept-Encoding"

Handler = Callable[[web.Request, Route], Awaitable[web.StreamResponse]]


class NpmRegistry:
    """A configured npm registry (implements `batlehub.api.Registry`)."""

    def __init__(self, settings: RegistrySettings, services: RegistryServices) -> None:
        self.name = settings.name
        self.settings = settings
        self.services = services
        self.options = settings.validated_options(NpmOptions)
        self.mode = self.options.mode
        self.local = LocalPackages(services.packages, services.policy)
        self.artifacts = services.artifacts
        self.rendered = services.rendered_cache()
        self.proxy: UpstreamProxy | None = None
        if self.mode != "local" and self.options.upstreams:
            self.proxy = UpstreamProxy(
                services,
                upstreams=list(self.options.upstreams),
                metadata_ttl_secs=self.options.cache.metadata_ttl_secs,
                serve_stale=self.options.cache.serve_stale,
                warm_packages=list(self.options.cache.warm_packages),
                guard_publishes=self.mode == "hybrid",
            )
        self.accounts = accounts.Accounts(services, self.proxy, self.local)
        self._warm_task: asyncio.Task[None] | None = None
        self._routes: dict[tuple[str, str], Handler] = {
            ("package", "GET"): self.get_packument,
            ("package", "PUT"): self.put_package,
            ("package_rev", "PUT"): self.put_package_rev,
            ("package_rev", "DELETE"): self.delete_package,
            ("version", "GET"): self.get_version,
            ("tarball", "GET"): self.get_tarball,
            ("tarball_rev", "DELETE"): self.delete_tarball,
            ("dist_tags", "GET"): self.get_dist_tags,
            ("dist_tags", "PUT"): self.put_dist_tag,
            ("dist_tags", "POST"): self.put_dist_tag,
            ("dist_tags", "DELETE"): self.delete_dist_tag,
            ("search", "GET"): self.search,
            ("whoami", "GET"): accounts.whoami,
            ("ping", "GET"): accounts.ping,
            ("web_login", "POST"): self.accounts.web_login,
            ("web_login_done", "GET"): self.accounts.web_login_done,
            ("stars", "GET"): accounts.stars,
            ("login", "PUT"): self.accounts.login,
            ("login", "GET"): self.accounts.user_lookup,
            ("logout", "DELETE"): self.accounts.logout,
            ("audit", "POST"): self.accounts.audit,
        }

    # --- Registry protocol ----------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[banner_header(self.services.cache, "npm-notice")])
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app

    async def startup(self) -> None:
        self.local.none_here = self.mode == "proxy" and not await self.local.store.has_packages()
        if self.proxy is not None and self.options.cache.warm_packages:
            self._warm_task = asyncio.create_task(self.proxy.warm(), name=f"npm-warm-{self.name}")

    async def shutdown(self) -> None:
        if self._warm_task is not None:
            self._warm_task.cancel()
            await asyncio.gather(self._warm_task, return_exceptions=True)

    # --- plumbing -------------------------------------------------------------------------------

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = registry_subpath(request)
        mount = registry_path(self.name)
        if request.method == "DELETE" and raw.startswith(mount):
            # npm 6 repeats the registry's path in the tarball DELETE of an unpublish when the
            # registry URL has a path (ours does); old CI images still carry it.
            doubled = parse_route(raw[len(mount) - 1 :])
            if doubled.kind == "tarball_rev":
                raw = raw[len(mount) - 1 :]
        route = parse_route(raw)
        label_route(request, route.kind)
        handler = route_handler(self._routes, route.kind, request, raw, "npm endpoint")
        return await handler(request, route)

    def _refuse_writes_in_proxy_mode(self) -> None:
        if self.mode == "proxy":
            raise MethodNotAllowed(
                f"registry {self.name!r} is a read-only proxy of its upstream registries;"
                " publish to a registry in local or hybrid mode"
            )

    async def _upstream(
        self, package: PackageName, *, abbreviated: bool, revalidate: bool = False
    ) -> UpstreamDocument | None:
        if self.proxy is None:
            return None
        return await self.proxy.packument(package.name, abbreviated=abbreviated, revalidate=revalidate)

    def _not_found(self, package: PackageName) -> NotFound:
        if self.proxy is None and self.mode != "local":
            return NotFound(
                f"package {package.name} not found in registry {self.name!r}, which has no upstream registry to"
                " ask: set upstreams in its [[registries]] entry to proxy one"
            )
        return NotFound(f"package {package.name} not found in registry {self.name!r}")

    # --- reading --------------------------------------------------------------------------------

    async def get_packument(self, request: web.Request, route: Route) -> web.StreamResponse:
        require(request, "releases:read")
        package = _package(route)
        write = request.query.get("write") == "true"
        abbreviated = not write and documents.wants_abbreviated(request.headers.get("Accept"))
        variant = "abbreviated" if abbreviated else "full"
        content_type = documents.ABBREVIATED_TYPE if abbreviated else documents.FULL_TYPE
        base = base_url(request)
        stamp = await self.local.stamp(package.name)
        if stamp is not None:
            if write:  # the CLI is about to edit: straight from the database
                body, _, _ = await self._render_local(
                    package, registry_url(request), abbreviated=False, everything=True
                )
                return web.Response(body=body, content_type=content_type, headers={"Cache-Control": "no-store"})
            etag = revision_etag(stamp, variant, base)
            if etag_matches(request.headers.get("If-None-Match"), etag):
                return web.Response(status=304, headers={"ETag": etag, "Cache-Control": "no-cache", "Vary": VARY})
            url = registry_url(request)

            async def render_local() -> Rendered:
                body, body_gzip, rendered_stamp = await self._render_local(package, url, abbreviated=abbreviated)
                return Rendered.of(body, revision_etag(rendered_stamp, variant, base), content_type, body_gzip)

            # Keyed by the stamp read above; bytes of a write since then carry their own ETag.
            rendered = await self.rendered.get_or_render((package.name, stamp, variant, base), render_local)
            return respond(request, rendered, {"Vary": VARY})
        upstream = await self._upstream(package, abbreviated=abbreviated)
        if upstream is None:
            raise self._not_found(package)
        key = (package.name, "upstream", upstream.upstream, upstream.content_id, variant, upstream.variant, base)
        url = registry_url(request)
        proxy = self.proxy
        assert proxy is not None

        async def render() -> Rendered:
            # Once per content id and variant, in a worker process for a big document.
            body = await proxy.documents.read(upstream)
            out, out_gzip, etag = await self.services.offload.run(
                len(body), documents.render_proxied, body, package.name, url, abbreviated
            )
            return Rendered.of(out, etag, content_type, out_gzip)

        rendered = await self.rendered.get_or_render(key, render)
        extra = {"Warning": '110 batlehub "served stale: upstream unavailable"'} if upstream.stale else {}
        return respond(request, rendered, {"Vary": VARY, **extra})

    async def _render_local(
        self, package: PackageName, url: str, *, abbreviated: bool, everything: bool = False
    ) -> tuple[bytes, bytes | None, str]:
        """A local packument's bytes, their gzip form and the stamp of what they show: as clients
        may see it, or `everything` (to edit it)."""
        rows = await self.local.store.load_rows(package.name)
        if rows is None:
            raise self._not_found(package)
        view = None if everything else await self.services.policy.local_view(package.name, rows.stamp)
        withheld, digest = (view.hidden, view.digest) if view else ((), "")
        run = self.services.offload.run
        return await run(rows.size, documents.render_local, rows, url, abbreviated, withheld, digest)

    async def package_page(self, request: web.Request, name: str, version: str | None) -> PackagePage:
        """The web UI's page of a package (core checked the caller may read this registry)."""
        package = parse_package_name(name)
        url = registry_url(request, self.name)
        if await self.local.stamp(package.name) is not None:
            local = await self.local.load(package)
            if local is not None:
                doc = documents.local_packument(local, url, abbreviated=False)
                return page.package_page(doc, package, version, local=local)
        upstream = await self._upstream(package, abbreviated=False)
        if upstream is None or self.proxy is None:
            raise self._not_found(package)
        found = await self.proxy.documents.extract(upstream, page.proxied_page, package.name, url, version)
        if found is None:
            raise NotFound(f"{package.name} has no version or dist-tag {version!r}")
        return replace(found, notes=(page.STALE_NOTE,)) if upstream.stale else found

    async def get_version(self, request: web.Request, route: Route) -> web.StreamResponse:
        require(request, "releases:read")
        package = _package(route)
        assert route.version is not None
        await self.services.policy.require_visible(package.name, route.version, actor(request))
        url = registry_url(request)
        if await self.local.stamp(package.name) is not None:
            local = await self.local.load(package)
            if local is None:
                raise self._not_found(package)
            full = documents.local_packument(local, url, abbreviated=False)
            manifest = documents.version_document(full, route.version)
        else:
            upstream = await self._upstream(package, abbreviated=False)
            if upstream is None or self.proxy is None:
                raise self._not_found(package)
            extract = self.proxy.documents.extract
            manifest = await extract(upstream, documents.proxied_version, package.name, url, route.version)
        if manifest is None:
            raise NotFound(f"version {route.version} of {package.name} not found")
        return json_response(manifest)

    async def get_tarball(self, request: web.Request, route: Route) -> web.StreamResponse:
        require(request, "source:read")
        package = _package(route)
        assert route.version is not None
        version = route.version
        await self.services.policy.require_visible(package.name, version, actor(request))
        filename = route.filename or package.tarball_filename(version)
        stamp = await self.local.stamp(package.name)
        if stamp is None:
            fetch = partial(self._proxied_tarball, package, version)
            return await self.artifacts.fetched_response(request, fetch, filename, what="tarball")
        # The artifact key of a version changes only with the package's revision (an unpublish
        # bumps it): core remembers it under the stamp.
        return await self.artifacts.local_response(
            request,
            (package.name, stamp, version),
            partial(self.local.tarball_key, package, version),
            filename,
            not_found=f"{package.name}@{version} not found in registry {self.name!r}",
            what="tarball",
        )

    async def _proxied_tarball(self, package: PackageName, version: str) -> str:
        upstream = await self._upstream(package, abbreviated=True)
        if upstream is None or self.proxy is None:
            raise self._not_found(package)
        dist = await self.proxy.documents.extract(upstream, documents.upstream_dist, version)
        if dist is None:  # maybe published upstream since we cached the document
            upstream = await self._upstream(package, abbreviated=True, revalidate=True)
            if upstream is not None:
                dist = await self.proxy.documents.extract(upstream, documents.upstream_dist, version)
        if dist is None:
            raise NotFound(f"{package.name}@{version} not found in registry {self.name!r}")
        return await self.proxy.tarball(package.name, version, dist)

    async def get_dist_tags(self, request: web.Request, route: Route) -> web.StreamResponse:
        require(request, "releases:read")
        package = _package(route)
        if await self.local.stamp(package.name) is not None:
            local = await self.local.load(package)
            if local is None:
                raise self._not_found(package)
            tags = documents.local_packument(local, "", abbreviated=True)["dist-tags"]
        else:
            upstream = await self._upstream(package, abbreviated=True)
            if upstream is None or self.proxy is None:
                raise self._not_found(package)
            tags = await self.proxy.documents.extract(upstream, documents.upstream_tags)
        if route.version is not None:
            if route.version not in tags:
                raise NotFound(f"{package.name} has no dist-tag {route.version!r}")
            return json_response(tags[route.version])
        return json_response(tags)

    async def search(self, request: web.Request, route: Route) -> web.StreamResponse:
        """Local packages first (exact name on top), then what the upstream's own search finds,
        without names that are local here (those are never the upstream's)."""
        require(request, "releases:read")
        text = (request.query.get("text") or request.query.get("q") or "").strip()
        try:
            size = max(1, min(250, int(request.query.get("size", "20"))))
            offset = max(0, int(request.query.get("from", "0")))
        except ValueError:
            raise BadRequest("size and from must be integers") from None
        hits, total = await self.services.packages.search(text, size + offset, 0)
        lowered = text.lower()
        objects = sorted(
            (_search_object(h.name, h.extra, h.modified, h.latest or "", h.owners) for h in hits),
            key=lambda o: (o["package"]["name"] != lowered, o["package"]["name"]),
        )
        if self.proxy is not None and len(objects) < offset + size:
            found, upstream_total = await self._upstream_search(text, offset + size - len(objects))
            for obj in found:
                name = obj["package"]["name"]
                if name in {h.name for h in hits} or await self.local.stamp(name) is not None:
                    continue
                objects.append(obj)
            total += upstream_total
        objects.sort(key=lambda o: o["package"]["name"] != lowered)  # stable: an exact name first
        page = objects[offset : offset + size]
        return json_response(
            {"objects": page, "total": max(total, len(objects)), "time": documents.iso_time(time.time())}
        )

    async def _upstream_search(self, text: str, wanted: int) -> tuple[list[dict[str, Any]], int]:
        """The upstream's own search results; the names seen so far when it cannot answer."""
        assert self.proxy is not None
        try:
            status, _, body = await self.proxy.documents.query(
                f"-/v1/search?text={quote(text, safe='')}&size={wanted}&from=0"
            )
            data = parse_json(body) if status == 200 else None
        except BatleHubError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("objects"), list):
            found = [
                _normalized_hit(o)
                for o in data["objects"]
                if isinstance(o, dict)
                and isinstance(o.get("package"), dict)
                and isinstance(o["package"].get("name"), str)
            ]
            total = data.get("total")
            return found[:wanted], total if isinstance(total, int) and total >= 0 else len(found)
        # What the summaries stored beside cached copies say (no document is read).
        known = (await self.services.proxied_packages(text))[:wanted]
        found = []
        for k in known:
            obj = _search_object(k.name, {"description": k.description}, k.fetched, k.latest, k.maintainers)
            obj["package"]["date"] = k.modified or obj["package"]["date"]
            found.append(obj)
        return found, len(found)

    # --- writing --------------------------------------------------------------------------------

    async def _local_for_write(self, package: PackageName) -> None:
        """Refuse writes to what is not published here, with a message that says why."""
        self._refuse_writes_in_proxy_mode()
        if await self.local.stamp(package.name) is None:
            if self.proxy is not None:
                # Not a 404: npm unpublish reads a 404 as "already gone" and reports success.
                raise MethodNotAllowed(
                    f"package {package.name} comes from an upstream registry; only packages published"
                    f" in registry {self.name!r} can be changed here"
                )
            raise NotFound(f"package {package.name} is not published in registry {self.name!r}")

    async def put_package(self, request: web.Request, route: Route) -> web.StreamResponse:
        """Publish (a body with `_attachments`) or a whole-document edit (deprecate, dist-tags)."""
        require(request, "releases:publish")
        self._refuse_writes_in_proxy_mode()
        package = _package(route)
        parse_package_name(package.name, new=True)
        limits = self.services.settings.limits
        limit = limits.max_artifact_size_bytes
        if request.content_length is not None and request.content_length > max_body_bytes(
            limit, limits.max_document_bytes
        ):
            raise PayloadTooLarge(f"publish body is larger than allowed for a {limit}-byte tarball")
        sink = TarballSink(self.artifacts)

        async def store_attachment(document: Mapping[str, Any], filename: str, chunks: Any) -> Any:
            # Refuse a conflicting version before reading hundreds of megabytes.
            if single_manifest(document) is not None:
                publish = parse_publish(package, document)
                if await self.local.tarball_key(package, publish.version) is not None:
                    raise _conflict(package, publish.version)
            return await sink(document, filename, chunks)

        try:
            parsed = await parse_document(
                body_reader(request),
                store_attachment=store_attachment,
                max_document_bytes=limits.max_document_bytes,
            )
            if not any(fields.get("_has_data") for fields in parsed.attachments.values()):
                if parsed.attachments:
                    raise BadRequest("the attachment has no data")
                return await self._update_document(request, package, parsed.document)
            publish = parse_publish(package, parsed.document)
            for filename, fields in parsed.attachments.items():
                length = fields.get("length")
                if length is not None and length != sink.size:
                    raise UnprocessableEntity(
                        f"attachment {filename} is {sink.size} bytes, but its length says {length}"
                    )
            blob = await sink.finish(expected_digests(publish.manifest.get("dist"), strict=True))
            assert blob is not None
            warning = await self.local.publish(publish, blob, actor(request))
        except BaseException:
            sink.discard()
            raise
        self.rendered.drop_package(package.name)
        headers = {"X-Quota-Warning": warning, "npm-notice": warning} if warning else {}
        return json_response({"ok": True, "id": package.name, "success": True}, status=201, headers=headers)

    async def _update_document(
        self, request: web.Request, package: PackageName, document: Mapping[str, Any]
    ) -> web.StreamResponse:
        if "users" in document and not {"versions", "dist-tags"} & set(document):
            raise MethodNotAllowed("stars are not kept by this registry (npm star and unstar change nothing here)")
        if await self.local.stamp(package.name) is None:
            if self.proxy is not None:
                await self._local_for_write(package)
            raise NotFound(
                f"package {package.name} is not published in registry {self.name!r}"
                " (a first publish must carry its tarball)"
            )
        await self.local.update_document(package, document, rev=None, actor=actor(request))
        self.rendered.drop_package(package.name)
        return json_response({"ok": True, "id": package.name})

    async def put_package_rev(self, request: web.Request, route: Route) -> web.StreamResponse:
        """A `-rev` PUT: npm's version unpublish (the whole document minus the removed versions),
        or `npm owner add/rm` (`{_id, _rev, maintainers}` only)."""
        require(request, "releases:publish")
        package = _package(route)
        await self._local_for_write(package)
        parsed = await parse_document(
            body_reader(request), max_document_bytes=self.services.settings.limits.max_document_bytes
        )
        if "maintainers" in parsed.document and "versions" not in parsed.document:
            await self.local.set_owners(package, parsed.document["maintainers"], rev=route.rev, actor=actor(request))
        else:
            require(request, "releases:delete")
            await self.local.update_document(package, parsed.document, rev=route.rev, actor=actor(request))
        self.rendered.drop_package(package.name)
        return json_response({"ok": True, "id": package.name})

    async def delete_package(self, request: web.Request, route: Route) -> web.StreamResponse:
        require(request, "releases:delete")
        package = _package(route)
        await self._local_for_write(package)
        await self.local.delete_package(package, rev=route.rev, actor=actor(request))
        self.rendered.drop_package(package.name)
        return json_response({"ok": True, "id": package.name})

    async def delete_tarball(self, request: web.Request, route: Route) -> web.StreamResponse:
        """The last step of npm's version unpublish. The version row is normally gone already;
        the blob is content-addressed (maybe shared) and left to the garbage sweep."""
        require(request, "releases:delete")
        package = _package(route)
        assert route.version is not None
        await self._local_for_write(package)
        await self.local.unpublish_version(package, route.version, rev=route.rev, actor=actor(request))
        self.rendered.drop_package(package.name)
        return json_response({"ok": True})

    async def put_dist_tag(self, request: web.Request, route: Route) -> web.StreamResponse:
        require(request, "releases:publish")
        package = _package(route)
        if route.version is None:
            raise MethodNotAllowed("name the tag: PUT /-/package/{name}/dist-tags/{tag}")
        await self._local_for_write(package)
        version = await read_json(request)
        if not isinstance(version, str):
            raise BadRequest('the body must be a JSON string with the version, e.g. "1.2.3"')
        validate_version(version)
        await self.local.set_dist_tag(package, route.version, version, actor=actor(request))
        self.rendered.drop_package(package.name)
        return json_response({"ok": True, "id": package.name, "dist-tags": {route.version: version}}, status=201)

    async def delete_dist_tag(self, request: web.Request, route: Route) -> web.StreamResponse:
        require(request, "releases:publish")
        package = _package(route)
        if route.version is None:
            raise MethodNotAllowed("name the tag: DELETE /-/package/{name}/dist-tags/{tag}")
        await self._local_for_write(package)
        await self.local.remove_dist_tag(package, route.version, actor=actor(request))
        self.rendered.drop_package(package.name)
        return json_response({"ok": True, "id": package.name})


def _package(route: Route) -> PackageName:
    assert route.package is not None
    return route.package


def _conflict(package: PackageName, version: str) -> BatleHubError:
    return Conflict(f"cannot publish over existing version {version} of {package.name}")


def _normalized_hit(hit: dict[str, Any]) -> dict[str, Any]:
    """An upstream's search hit in the shape npm prints (some registries answer with their own
    package documents: `dist-tags` instead of `version`, `time` instead of `date`)."""
    package = hit["package"]
    shaped = _search_object(package["name"], package, 0, "", ())
    shaped["package"].update({k: v for k, v in package.items() if k in shaped["package"]})
    if not isinstance(package.get("version"), str):
        shaped["package"]["version"] = str((package.get("dist-tags") or {}).get("latest", ""))
    if not isinstance(package.get("date"), str):
        modified = (package.get("time") or {}).get("modified") if isinstance(package.get("time"), dict) else None
        if isinstance(modified, str):
            shaped["package"]["date"] = modified
    for key in ("score", "searchScore"):
        if key in hit:
            shaped[key] = hit[key]
    return shaped


def _search_object(
    name: str, extra: Mapping[str, Any], modified: float, version: str, owners: tuple[str, ...]
) -> dict[str, Any]:
    maintainers = [{"username": owner} for owner in owners]
    keywords = extra.get("keywords")
    package = {
        "name": name,
        "scope": name.split("/", 1)[0][1:] if name.startswith("@") else "unscoped",
        "version": version,
        "description": extra.get("description", ""),
        "keywords": keywords if isinstance(keywords, list) else [],
        "date": documents.iso_time(modified),
        "links": {},
        "publisher": maintainers[0] if maintainers else {"username": ""},
        "maintainers": maintainers,
    }
    return {
        "package": package,
        "score": {"final": 1.0, "detail": {"quality": 1.0, "popularity": 1.0, "maintenance": 1.0}},
        "searchScore": 1.0,
        "flags": {},
    }
