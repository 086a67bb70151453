"""One npm registry under `/registries/{name}/`: routing, permissions and the three modes.

- `proxy`: read-only cache of the upstream registries; writes are refused.
- `local`: only packages published here; unknown names are 404.
- `hybrid`: a name that exists locally is served from local data only (never merged with the
  upstream's versions, so nobody can slip a version in from outside); other names are proxied.

Requests are dispatched on the raw path by `names.parse_route`, because scoped names arrive both
as `@scope%2fname` and `@scope/name` and the router would see them decoded.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from batlehub import appkeys
from batlehub.auth import ANONYMOUS, Identity, require, token_from_header
from batlehub.config import RegistrySettings
from batlehub.errors import (
    BadRequest,
    BatleHubError,
    Conflict,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UnprocessableEntity,
)
from batlehub.interfaces import RegistryServices
from batlehub.net import external_base_url
from batlehub.plugins import gather_hook
from batlehub_npm import documents
from batlehub_npm.blobresponse import open_blob, plain_download
from batlehub_npm.documents import Rendered, RenderedCache
from batlehub_npm.local import LocalStore, parse_publish
from batlehub_npm.names import (
    PackageName,
    Route,
    parse_package_name,
    parse_route,
    split_scope,
    validate_version,
)
from batlehub_npm.publish import TarballSink, max_body_bytes, parse_document, single_manifest

log = logging.getLogger(__name__)

MODES = ("proxy", "local", "hybrid")
_CACHE_KEYS = {"metadata_ttl_secs", "serve_stale", "warm_packages"}
_KNOWN_KEYS = {"mode", "upstreams", "cache"}
SMALL_BODY_LIMIT = 1024 * 1024
AUDIT_BODY_LIMIT = 32 * 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
ARTIFACT_KEY_MEMO_ENTRIES = 100_000
"""(package, revision stamp, version) -> storage key entries a process remembers (~200 bytes each)."""

Handler = Callable[[web.Request, Route], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class NpmOptions:
    mode: str
    upstreams: tuple[str, ...]
    metadata_ttl_secs: float
    serve_stale: bool
    warm_packages: tuple[str, ...]


def options_of(raw: Mapping[str, Any]) -> NpmOptions:
    cache = raw.get("cache") or {}
    return NpmOptions(
        mode=raw.get("mode", "hybrid"),
        upstreams=tuple(u.rstrip("/") + "/" for u in raw.get("upstreams") or ()),
        metadata_ttl_secs=float(cache.get("metadata_ttl_secs", 300)),
        serve_stale=bool(cache.get("serve_stale", True)),
        warm_packages=tuple(cache.get("warm_packages") or ()),
    )


def validate_options(raw: Mapping[str, Any]) -> list[str]:
    """Problems of an npm `[[registries]]` entry's own keys, each naming its key."""
    problems = []
    for key in raw:
        if key not in _KNOWN_KEYS:
            problems.append(f"{key}: unknown key (known: {', '.join(sorted(_KNOWN_KEYS))})")
    mode = raw.get("mode", "hybrid")
    if mode not in MODES:
        problems.append(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    upstreams = raw.get("upstreams", [])
    if not isinstance(upstreams, list | tuple) or not all(isinstance(u, str) for u in upstreams):
        problems.append(f"upstreams: expected a list of URLs, got {upstreams!r}")
        upstreams = []
    for i, url in enumerate(upstreams):
        if not url.startswith(("http://", "https://")):
            problems.append(f"upstreams[{i}]: expected an http:// or https:// URL, got {url!r}")
    if mode == "proxy" and not upstreams:
        problems.append('upstreams: required when mode = "proxy" (the upstream registry URLs to cache)')
    cache = raw.get("cache", {})
    if not isinstance(cache, Mapping):
        problems.append(f"cache: expected a table, got {cache!r}")
        return problems
    for key in cache:
        if key not in _CACHE_KEYS:
            problems.append(f"cache.{key}: unknown key (known: {', '.join(sorted(_CACHE_KEYS))})")
    ttl = cache.get("metadata_ttl_secs", 300)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0:
        problems.append(f"cache.metadata_ttl_secs: expected a number of seconds >= 0, got {ttl!r}")
    if not isinstance(cache.get("serve_stale", True), bool):
        problems.append(f"cache.serve_stale: expected true or false, got {cache.get('serve_stale')!r}")
    warm = cache.get("warm_packages", [])
    if not isinstance(warm, list | tuple) or not all(isinstance(w, str) for w in warm):
        problems.append(f'cache.warm_packages: expected a list of "name" or "name@version", got {warm!r}')
    else:
        for i, spec in enumerate(warm):
            name, version = split_scope(spec)
            try:
                parse_package_name(name)
                if version is not None:
                    validate_version(version)
            except BatleHubError as exc:
                problems.append(f"cache.warm_packages[{i}]: {exc.message}")
    return problems


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=documents.serialize(data), content_type="application/json", headers=headers)


async def _read_small_json(request: web.Request, limit: int = SMALL_BODY_LIMIT) -> Any:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    try:
        return json.loads(body or b"null")
    except ValueError:
        raise BadRequest("request body is not valid JSON") from None


class _BlobMissing(Exception):
    """A blob that should be stored is not (any more)."""


class NpmRegistry:
    """A configured npm registry (implements `batlehub.interfaces.Registry`)."""

    def __init__(self, settings: RegistrySettings, services: RegistryServices) -> None:
        self.name = settings.name
        self.settings = settings
        self.services = services
        self.options = options_of(settings.options)
        self.mode = self.options.mode
        self.local = LocalStore(settings, services)
        self.rendered = RenderedCache()
        self.proxy: Any = None
        if self.mode != "local" and self.options.upstreams:
            from batlehub_npm.upstream import UpstreamProxy

            self.proxy = UpstreamProxy(
                settings,
                services,
                upstreams=list(self.options.upstreams),
                metadata_ttl_secs=self.options.metadata_ttl_secs,
                serve_stale=self.options.serve_stale,
                warm_packages=list(self.options.warm_packages),
            )
        self._warm_task: asyncio.Task[None] | None = None
        self._artifact_keys: dict[tuple[str, str, str], str] = {}
        self._banner_warned_at = float("-inf")
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
            ("whoami", "GET"): self.whoami,
            ("ping", "GET"): self.ping,
            ("web_login", "POST"): self.web_login,
            ("login", "PUT"): self.login,
            ("login", "GET"): self.login_lookup,
            ("logout", "DELETE"): self.logout,
            ("audit", "POST"): self.audit,
        }

    # --- Registry protocol ----------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self.npm_notice])
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app

    async def startup(self) -> None:
        if self.proxy is not None and self.options.warm_packages:
            self._warm_task = asyncio.create_task(self.proxy.warm(), name=f"npm-warm-{self.name}")

    async def shutdown(self) -> None:
        if self._warm_task is not None:
            self._warm_task.cancel()
            await asyncio.gather(self._warm_task, return_exceptions=True)
        if self.proxy is not None:
            await self.proxy.close()

    # --- plumbing -------------------------------------------------------------------------------

    @web.middleware
    async def npm_notice(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The global banner rides on every npm response as `npm-notice`; the npm CLI prints it."""
        notice = await self._notice()
        try:
            response: web.StreamResponse = await handler(request)
        except BatleHubError as exc:
            if notice:
                exc.headers.setdefault("npm-notice", notice)
            raise
        if notice and not response.prepared:
            response.headers.setdefault("npm-notice", notice)  # a handler's own notice (quota) wins
        return response

    async def _notice(self) -> str | None:
        try:
            banner = await self.services.cache.get_banner()
        except Exception as exc:
            now = time.monotonic()
            if now - self._banner_warned_at > 60:  # once a minute, not once per request
                self._banner_warned_at = now
                log.warning("could not read the banner from the cache backend: %s", exc)
            return None
        if banner is None or not banner.message:
            return None
        return " ".join(banner.message.split())  # one header line, whatever the admin typed

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = request.rel_url.raw_path
        prefix = f"/registries/{self.name}"
        rel = raw[len(prefix) :] if raw.startswith(prefix) else raw
        route = parse_route(rel)
        method = "GET" if request.method == "HEAD" else request.method
        handler = self._routes.get((route.kind, method))
        if handler is None:
            if route.kind == "unknown" or not any(kind == route.kind for kind, _ in self._routes):
                raise NotFound(f"no such npm endpoint: {request.method} {rel}")
            allowed = sorted({m for kind, m in self._routes if kind == route.kind})
            raise MethodNotAllowed(
                f"{request.method} is not supported here (allowed: {', '.join(allowed)})",
                headers={"Allow": ", ".join(allowed)},
            )
        return await handler(request, route)

    def _identity(self, request: web.Request) -> Identity:
        return request.get(appkeys.IDENTITY, ANONYMOUS)

    def _client_ip(self, request: web.Request) -> str | None:
        return request.get(appkeys.CLIENT_IP)

    def _refuse_writes_in_proxy_mode(self) -> None:
        if self.mode == "proxy":
            raise MethodNotAllowed(
                f"registry {self.name!r} is a read-only proxy of its upstream registries;"
                " publish to a registry in local or hybrid mode"
            )

    async def _is_local(self, package: PackageName) -> str | None:
        """The local revision stamp of `package`, or None when it is not published here."""
        return await self.local.stamp(package.name)

    async def _upstream(self, package: PackageName, *, abbreviated: bool, revalidate: bool = False) -> Any:
        if self.proxy is None:
            return None
        return await self.proxy.packument(package.name, abbreviated=abbreviated, revalidate=revalidate)

    def _not_found(self, package: PackageName) -> NotFound:
        return NotFound(f"package {package.name} not found in registry {self.name!r}")

    def _respond_document(
        self, request: web.Request, rendered: Rendered, extra: Mapping[str, str] | None = None
    ) -> web.Response:
        headers = {
            "ETag": rendered.etag,
            "Cache-Control": "no-cache",
            "Vary": "Accept, Accept-Encoding",
            **(extra or {}),
        }
        if documents.etag_matches(request.headers.get("If-None-Match"), rendered.etag):
            return web.Response(status=304, headers=headers)
        body = rendered.body
        if len(body) > 1024 and "gzip" in request.headers.get("Accept-Encoding", "").lower():
            body = rendered.gzipped()
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, content_type=rendered.content_type, headers=headers)

    async def _fire(self, hook: str, **kwargs: Any) -> None:
        try:
            await gather_hook(getattr(self.services.pm.hook, hook)(**kwargs))
        except Exception:
            log.exception("a plugin's %s hook failed", hook)

    # --- reading --------------------------------------------------------------------------------

    async def get_packument(self, request: web.Request, route: Route) -> web.StreamResponse:
        require(request, "releases:read")
        package = route.package
        assert package is not None
        write = request.query.get("write") == "true"
        abbreviated = not write and documents.wants_abbreviated(request.headers.get("Accept"))
        variant = "abbreviated" if abbreviated else "full"
        content_type = documents.ABBREVIATED_TYPE if abbreviated else documents.FULL_TYPE
        base = external_base_url(request)
        stamp = await self._is_local(package)
        if stamp is not None:
            if write:  # the CLI is about to edit: straight from the database
                local = await self.local.load(package)
                if local is None:
                    raise self._not_found(package)
                doc = documents.local_packument(local, base, self.name, abbreviated=False)
                body = documents.serialize(doc)
                return web.Response(body=body, content_type=content_type, headers={"Cache-Control": "no-store"})
            etag = documents.revision_etag(stamp, variant, base)
            if documents.etag_matches(request.headers.get("If-None-Match"), etag):
                return web.Response(
                    status=304, headers={"ETag": etag, "Cache-Control": "no-cache", "Vary": "Accept, Accept-Encoding"}
                )
            rendered = self.rendered.get((self.name, package.name, stamp, variant, base))
            if rendered is None:
                local = await self.local.load(package)
                if local is None:
                    raise self._not_found(package)
                doc = documents.local_packument(local, base, self.name, abbreviated=abbreviated)
                rendered = Rendered(
                    documents.serialize(doc), documents.revision_etag(local.stamp, variant, base), content_type
                )
                self.rendered.put((self.name, package.name, local.stamp, variant, base), rendered)
            return self._respond_document(request, rendered)
        upstream = await self._upstream(package, abbreviated=abbreviated)
        if upstream is None:
            raise self._not_found(package)
        key = (
            self.name,
            package.name,
            "upstream",
            upstream.upstream,
            upstream.content_id or upstream.fetched_at,
            variant,
            upstream.abbreviated,
            base,
        )
        rendered = self.rendered.get(key)
        if rendered is None:
            doc = documents.proxied_packument(upstream.data, package, base, self.name, abbreviated=abbreviated)
            body = documents.serialize(doc)
            rendered = Rendered(body, documents.content_etag(body), content_type)
            self.rendered.put(key, rendered)
        extra = {"Warning": '110 batlehub "served stale: upstream unavailable"'} if upstream.stale else {}
        return self._respond_document(request, rendered, extra)

    async def _full_document(self, request: web.Request, package: PackageName) -> dict[str, Any]:
        base = external_base_url(request)
        if await self._is_local(package) is not None:
            local = await self.local.load(package)
            if local is not None:
                return documents.local_packument(local, base, self.name, abbreviated=False)
            raise self._not_found(package)
        upstream = await self._upstream(package, abbreviated=False)
        if upstream is None:
            raise self._not_found(package)
        return documents.proxied_packument(upstream.data, package, base, self.name, abbreviated=False)

    async def get_version(self, request: web.Request, route: Route) -> web.StreamResponse:
        require(request, "releases:read")
        package = route.package
        assert package is not None and route.version is not None
        doc = await self._full_document(request, package)
        manifest = documents.version_document(doc, route.version)
        if manifest is None:
            raise NotFound(f"version {route.version} of {package.name} not found")
        return _json(manifest)

    async def get_tarball(self, request: web.Request, route: Route) -> web.StreamResponse:
        require(request, "source:read")
        package = route.package
        assert package is not None and route.version is not None
        version = route.version
        filename = route.filename or package.tarball_filename(version)
        stamp = await self._is_local(package)
        if stamp is None:
            return await self._get_proxied_tarball(request, package, version, filename)
        # The artifact key of a version changes only with the package's revision (an unpublish
        # bumps it), and the stamp is the shared revision: a remembered key is as good as a query.
        memo = (package.name, stamp, version)
        key = self._artifact_keys.get(memo)
        if key is not None:
            try:
                return await self._serve_blob(request, key, filename)
            except _BlobMissing:
                del self._artifact_keys[memo]  # gone from storage under us: ask the database again
        key = await self.local.artifact_key(package, version)
        if key is None:
            raise NotFound(f"{package.name}@{version} not found in registry {self.name!r}")
        if len(self._artifact_keys) >= ARTIFACT_KEY_MEMO_ENTRIES:
            self._artifact_keys.clear()
        self._artifact_keys[memo] = key
        try:
            return await self._serve_blob(request, key, filename)
        except _BlobMissing:
            raise NotFound(f"tarball {filename} is missing from storage") from None

    async def _get_proxied_tarball(
        self, request: web.Request, package: PackageName, version: str, filename: str
    ) -> web.StreamResponse:
        key = await self._proxied_tarball(package, version)
        try:
            return await self._serve_blob(request, key, filename)
        except _BlobMissing:
            # The proxy remembered the blob as stored, but the storage sweep (or an operator)
            # removed it since: make the proxy look again, which fetches it anew if need be.
            self.proxy.forget_blob(key)
        key = await self._proxied_tarball(package, version)
        try:
            return await self._serve_blob(request, key, filename)
        except _BlobMissing:
            raise NotFound(f"tarball {filename} is missing from storage") from None

    async def _proxied_tarball(self, package: PackageName, version: str) -> str:
        upstream = await self._upstream(package, abbreviated=True)
        if upstream is None:
            raise self._not_found(package)
        manifest = (upstream.data.get("versions") or {}).get(version)
        if manifest is None:  # maybe published upstream since we cached the document
            upstream = await self._upstream(package, abbreviated=True, revalidate=True)
            manifest = ((upstream.data if upstream else {}).get("versions") or {}).get(version)
        if not isinstance(manifest, Mapping) or not isinstance(manifest.get("dist"), Mapping):
            raise NotFound(f"{package.name}@{version} not found in registry {self.name!r}")
        return str(await self.proxy.tarball(package.name, version, manifest["dist"]))

    async def _serve_blob(self, request: web.Request, key: str, filename: str) -> web.StreamResponse:
        """The response that sends a stored blob. Raises `_BlobMissing` when storage does not
        have it, before anything is sent, so a caller that trusted a memo can look again."""
        storage = self.services.storage
        headers = {
            "Content-Type": "application/octet-stream",
            "Cache-Control": "public, max-age=31536000, immutable",
            "Content-Disposition": f'attachment; filename="{filename}"',
        }
        path = storage.local_path(key)
        if path is not None:
            if not plain_download(request):
                return web.FileResponse(path, headers=headers)  # Range and conditional requests
            try:
                return open_blob(path, headers)
            except FileNotFoundError:
                raise _BlobMissing(key) from None
        url = await storage.presigned_url(key)
        if url:
            return web.Response(status=302, headers={"Location": url, "Cache-Control": "no-store"})
        stat = await storage.stat(key)
        if stat is None:
            raise _BlobMissing(key)
        response = web.StreamResponse(headers={**headers, "Content-Length": str(stat.size)})
        await response.prepare(request)
        if request.method != "HEAD":
            async for chunk in storage.get(key):
                await response.write(chunk)
        await response.write_eof()
        return response

    async def get_dist_tags(self, request: web.Request, route: Route) -> web.StreamResponse:
        require(request, "releases:read")
        package = route.package
        assert package is not None
        if await self._is_local(package) is not None:
            local = await self.local.load(package)
            if local is None:
                raise self._not_found(package)
            tags = documents.local_packument(local, "", self.name, abbreviated=True)["dist-tags"]
        else:
            upstream = await self._upstream(package, abbreviated=True)
            if upstream is None:
                raise self._not_found(package)
            tags = upstream.data.get("dist-tags") or {}
        if route.version is not None:
            if route.version not in tags:
                raise NotFound(f"{package.name} has no dist-tag {route.version!r}")
            return _json(tags[route.version])
        return _json(tags)

    async def search(self, request: web.Request, route: Route) -> web.StreamResponse:
        require(request, "releases:read")
        text = (request.query.get("text") or request.query.get("q") or "").strip()
        try:
            size = max(1, min(250, int(request.query.get("size", "20"))))
            offset = max(0, int(request.query.get("from", "0")))
        except ValueError:
            raise BadRequest("size and from must be integers") from None
        rows, total = await self.local.search(text, size + offset, 0)
        objects = [self._search_object(r["name"], r["extra"], r["modified"]) for r in rows]
        local_names = {r["name"] for r in rows}
        if self.proxy is not None and len(objects) < offset + size:
            for name in await self._known_upstream_names(text, offset + size - len(objects), local_names):
                objects.append(await self._proxied_search_object(name))
                total += 1
        lowered = text.lower()
        objects.sort(key=lambda o: (o["package"]["name"] != lowered, o["package"]["name"]))
        page = objects[offset : offset + size]
        for obj in page:
            if obj["package"]["version"] == "":
                manifest = await self.local.latest_manifest(obj["package"]["name"])
                if manifest:
                    obj["package"]["version"] = manifest.get("version", "")
        return _json({"objects": page, "total": max(total, len(objects)), "time": documents.iso_time(time.time())})

    def _search_object(self, name: str, extra_raw: str, modified: float) -> dict[str, Any]:
        extra = json.loads(extra_raw or "{}")
        maintainers = [{"username": m.get("name", "")} for m in extra.get("maintainers", []) if isinstance(m, dict)]
        package = {
            "name": name,
            "scope": name.split("/", 1)[0][1:] if name.startswith("@") else "unscoped",
            "version": "",
            "description": extra.get("description", ""),
            "keywords": extra.get("keywords", []) if isinstance(extra.get("keywords"), list) else [],
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

    async def _known_upstream_names(self, text: str, limit: int, exclude: set[str]) -> list[str]:
        pattern = "%" + text.lower().replace("\\", "").replace("%", "").replace("_", "\\_") + "%"
        rows = await self.services.db.fetch(
            "SELECT DISTINCT name FROM upstream_documents WHERE registry = $1 AND LOWER(name) LIKE $2 ESCAPE '\\'"
            " ORDER BY name",
            self.name,
            pattern,
        )
        return [r["name"] for r in rows if r["name"] not in exclude][:limit]

    async def _proxied_search_object(self, name: str) -> dict[str, Any]:
        obj = self._search_object(name, "{}", 0)
        try:
            upstream = await asyncio.wait_for(self.proxy.packument(name, abbreviated=True), timeout=5)
        except Exception:
            return obj
        if upstream is not None:
            obj["package"]["version"] = (upstream.data.get("dist-tags") or {}).get("latest", "")
            obj["package"]["description"] = upstream.data.get("description", "")
            modified = upstream.data.get("modified")
            if isinstance(modified, str):
                obj["package"]["date"] = modified
        return obj

    # --- writing --------------------------------------------------------------------------------

    async def put_package(self, request: web.Request, route: Route) -> web.StreamResponse:
        """Publish (a body with `_attachments`) or a whole-document edit (deprecate, dist-tags)."""
        identity = require(request, "releases:publish")
        self._refuse_writes_in_proxy_mode()
        package = route.package
        assert package is not None
        parse_package_name(package.name, new=True)
        limit = self.services.settings.limits.max_artifact_size_bytes
        if request.content_length is not None and request.content_length > max_body_bytes(limit):
            raise PayloadTooLarge(f"publish body is larger than allowed for a {limit}-byte tarball")
        sink = TarballSink(self.services.storage, limit, self.services.settings.data_dir / "tmp")

        async def store_attachment(document: Mapping[str, Any], filename: str, chunks: Any) -> Any:
            # Refuse a conflicting version before reading hundreds of megabytes.
            if single_manifest(document) is not None:
                publish = parse_publish(package, document)
                if await self.local.artifact_key(package, publish.version) is not None:
                    raise_conflict(package, publish.version)
            return await sink(document, filename, chunks)

        try:
            parsed = await parse_document(request.content.readany, store_attachment=store_attachment)
            if any(fields.get("_has_data") for fields in parsed.attachments.values()):
                publish = parse_publish(package, parsed.document)
                blob = await sink.finish(publish.manifest)
                assert blob is not None
                for filename, fields in parsed.attachments.items():
                    length = fields.get("length")
                    if length is not None and length != blob.size:
                        raise UnprocessableEntity(
                            f"attachment {filename} is {blob.size} bytes, but its length says {length}"
                        )
                warning = await self.local.publish(publish, blob, identity.user_id, self._client_ip(request))
            elif parsed.attachments:
                raise BadRequest("the attachment has no data")
            else:
                return await self._update_document(request, package, parsed.document, identity)
        finally:
            sink.discard()
        self.rendered.drop_package(self.name, package.name)
        await self._fire(
            "on_publish",
            registry=self.name,
            package=package.name,
            version=publish.version,
            user_id=identity.user_id,
            size=blob.size,
        )
        headers = {"X-Quota-Warning": warning} if warning else {}
        if warning:
            headers["npm-notice"] = warning
        return _json({"ok": True, "id": package.name, "success": True}, status=201, headers=headers)

    async def _update_document(
        self, request: web.Request, package: PackageName, document: Mapping[str, Any], identity: Identity
    ) -> web.StreamResponse:
        if await self._is_local(package) is None:
            raise NotFound(
                f"package {package.name} is not published in registry {self.name!r}"
                " (a first publish must carry its tarball)"
            )
        await self.local.update_document(
            package,
            document,
            rev=None,
            user_id=identity.user_id,
            client_ip=self._client_ip(request),
            may_delete=False,
        )
        self.rendered.drop_package(self.name, package.name)
        return _json({"ok": True, "id": package.name})

    async def _local_for_write(self, package: PackageName) -> None:
        self._refuse_writes_in_proxy_mode()
        if await self._is_local(package) is None:
            if self.proxy is not None:
                # Not a 404: npm unpublish reads a 404 as "already gone" and reports success.
                raise MethodNotAllowed(
                    f"package {package.name} comes from an upstream registry; only packages published"
                    f" in registry {self.name!r} can be changed here"
                )
            raise NotFound(f"package {package.name} is not published in registry {self.name!r}")

    async def put_package_rev(self, request: web.Request, route: Route) -> web.StreamResponse:
        """npm's version unpublish: the whole document minus the removed versions."""
        identity = require(request, "releases:delete")
        package = route.package
        assert package is not None
        await self._local_for_write(package)
        parsed = await parse_document(request.content.readany)
        removed = await self.local.update_document(
            package,
            parsed.document,
            rev=route.rev,
            user_id=identity.user_id,
            client_ip=self._client_ip(request),
            may_delete=True,
        )
        self.rendered.drop_package(self.name, package.name)
        for version in removed:
            await self._fire(
                "on_unpublish", registry=self.name, package=package.name, version=version, user_id=identity.user_id
            )
        return _json({"ok": True, "id": package.name})

    async def delete_package(self, request: web.Request, route: Route) -> web.StreamResponse:
        identity = require(request, "releases:delete")
        package = route.package
        assert package is not None
        await self._local_for_write(package)
        await self.local.delete_package(
            package, rev=route.rev, user_id=identity.user_id, client_ip=self._client_ip(request)
        )
        self.rendered.drop_package(self.name, package.name)
        await self._fire(
            "on_unpublish", registry=self.name, package=package.name, version=None, user_id=identity.user_id
        )
        return _json({"ok": True, "id": package.name})

    async def delete_tarball(self, request: web.Request, route: Route) -> web.StreamResponse:
        """The last step of npm's version unpublish. The version row is normally gone already;
        the blob is content-addressed (maybe shared) and left to the garbage sweep."""
        identity = require(request, "releases:delete")
        package = route.package
        assert package is not None and route.version is not None
        await self._local_for_write(package)
        removed = await self.local.unpublish_version(
            package, route.version, rev=route.rev, user_id=identity.user_id, client_ip=self._client_ip(request)
        )
        self.rendered.drop_package(self.name, package.name)
        if removed:
            await self._fire(
                "on_unpublish",
                registry=self.name,
                package=package.name,
                version=route.version,
                user_id=identity.user_id,
            )
        return _json({"ok": True})

    async def put_dist_tag(self, request: web.Request, route: Route) -> web.StreamResponse:
        identity = require(request, "releases:publish")
        package = route.package
        assert package is not None
        if route.version is None:
            raise MethodNotAllowed("name the tag: PUT /-/package/{name}/dist-tags/{tag}")
        await self._local_for_write(package)
        version = await _read_small_json(request)
        if not isinstance(version, str):
            raise BadRequest('the body must be a JSON string with the version, e.g. "1.2.3"')
        validate_version(version)
        await self.local.set_dist_tag(
            package, route.version, version, user_id=identity.user_id, client_ip=self._client_ip(request)
        )
        self.rendered.drop_package(self.name, package.name)
        return _json({"ok": True, "id": package.name, "dist-tags": {route.version: version}}, status=201)

    async def delete_dist_tag(self, request: web.Request, route: Route) -> web.StreamResponse:
        identity = require(request, "releases:delete")
        package = route.package
        assert package is not None
        if route.version is None:
            raise MethodNotAllowed("name the tag: DELETE /-/package/{name}/dist-tags/{tag}")
        await self._local_for_write(package)
        await self.local.remove_dist_tag(
            package, route.version, user_id=identity.user_id, client_ip=self._client_ip(request)
        )
        self.rendered.drop_package(self.name, package.name)
        return _json({"ok": True, "id": package.name})

    # --- identity -------------------------------------------------------------------------------

    async def whoami(self, request: web.Request, route: Route) -> web.StreamResponse:
        identity = self._identity(request)
        if identity.anonymous:
            raise Unauthorized(
                "not logged in: put a token for this registry in your .npmrc"
                f" (//HOST/registries/{self.name}/:_authToken=...)",
                headers={"WWW-Authenticate": 'Bearer realm="batlehub"'},
            )
        return _json({"username": identity.user_id})

    async def ping(self, request: web.Request, route: Route) -> web.StreamResponse:
        return _json({})

    async def web_login(self, request: web.Request, route: Route) -> web.StreamResponse:
        # A 4xx here makes npm fall back to the CouchDB-style login below.
        raise NotFound("web login is not supported: log in with your user id and an access token as the password")

    async def login(self, request: web.Request, route: Route) -> web.StreamResponse:
        """`npm login`: BatleHub has no passwords, so the "password" must be a valid access token
        of that user; the client then stores it as its auth token."""
        name = route.extra or ""
        body = await _read_small_json(request)
        if not isinstance(body, Mapping):
            raise BadRequest("the login body must be a JSON object")
        password = body.get("password")
        identity = await self.services.auth.identify(password) if isinstance(password, str) and password else None
        if identity is None or identity.user_id is None:
            raise Unauthorized(
                "BatleHub has no passwords: log in with your user id and an access token as the password,"
                " or put the token in your .npmrc"
            )
        if identity.user_id != name:
            raise Unauthorized(f"that token belongs to another user; log in as {identity.user_id!r}")
        return _json({"ok": True, "id": f"org.couchdb.user:{name}", "token": password}, status=201)

    async def login_lookup(self, request: web.Request, route: Route) -> web.StreamResponse:
        raise NotFound("user documents are not available; users are managed with access tokens")

    async def logout(self, request: web.Request, route: Route) -> web.StreamResponse:
        """`npm logout`: revoke the database token the client logged in with (and only that one;
        tokens from the config file cannot be revoked from outside)."""
        identity = self._identity(request)
        if identity.anonymous:
            raise Unauthorized("not logged in")
        presented = token_from_header(request.headers.get("Authorization"))
        if presented is None or presented != route.extra:
            raise Forbidden("only the token used for this request can be revoked")
        revoked = await self.services.auth.revoke_by_value(presented)
        return _json({"ok": True, "revoked": revoked})

    # --- audit ----------------------------------------------------------------------------------

    async def audit(self, request: web.Request, route: Route) -> web.StreamResponse:
        require(request, "releases:read")
        sub = route.extra or ""
        if request.content_length is not None and request.content_length > AUDIT_BODY_LIMIT:
            raise PayloadTooLarge(f"audit request is larger than {AUDIT_BODY_LIMIT} bytes")
        body = await request.content.read(AUDIT_BODY_LIMIT + 1)
        if len(body) > AUDIT_BODY_LIMIT:
            raise PayloadTooLarge(f"audit request is larger than {AUDIT_BODY_LIMIT} bytes")
        if self.proxy is None:
            if sub == "advisories/bulk":
                return _json({})
            if sub == "audits/quick":
                return _json(_EMPTY_QUICK_AUDIT)
            raise NotFound(f"no such audit endpoint: {sub}")
        # aiohttp may already have undone the client's gzip; say what the bytes really are.
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        if body[:2] == _GZIP_MAGIC:
            headers["Content-Encoding"] = "gzip"
        if sub == "advisories/bulk":
            body = await self._without_local_names(body)
        status, out_headers, out_body = await self.proxy.audit(f"-/npm/v1/security/{sub}", body, headers)
        content_type = out_headers.get("Content-Type") or out_headers.get("content-type") or "application/json"
        return web.Response(status=status, body=out_body, headers={"Content-Type": content_type})

    async def _without_local_names(self, body: bytes) -> bytes:
        """Local package names are private: never tell an upstream which ones we have."""
        gzipped = body[:2] == _GZIP_MAGIC
        try:
            data = json.loads(gzip.decompress(body) if gzipped else body)
        except (ValueError, OSError, EOFError):
            raise BadRequest("audit request body is not (gzip-compressed) JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("audit request body must be an object of name -> versions")
        kept = {}
        for name, versions in data.items():
            try:
                local = await self._is_local(parse_package_name(name))
            except BatleHubError:
                local = None
            if local is None:
                kept[name] = versions
        raw = json.dumps(kept).encode()
        return gzip.compress(raw) if gzipped else raw


def raise_conflict(package: PackageName, version: str) -> None:
    raise Conflict(f"cannot publish over existing version {version} of {package.name}")


_EMPTY_QUICK_AUDIT = {
    "actions": [],
    "advisories": {},
    "muted": [],
    "metadata": {
        "vulnerabilities": {"info": 0, "low": 0, "moderate": 0, "high": 0, "critical": 0},
        "dependencies": 0,
        "devDependencies": 0,
        "optionalDependencies": 0,
        "totalDependencies": 0,
    },
}

__all__ = ["NpmOptions", "NpmRegistry", "options_of", "validate_options"]
