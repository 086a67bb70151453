"""One PyPI registry under `/registries/{name}/`: routing, the index documents and the three modes.

- `proxy`: read-only cache of the upstream indexes; uploads are refused.
- `local`: only projects uploaded here; unknown names are 404.
- `hybrid`: a project that exists locally is served from local data only (never merged with the
  upstream's files, so nobody can slip a file in from outside); other names are proxied.

Routes (relative to the mount point): `simple/` and `simple/<project>/` (PEP 503 HTML or PEP 691
JSON by `Accept`), `files/<project>/<filename>` (and `<filename>.metadata`, PEP 658),
`pypi/<project>/json` and `pypi/<project>/<version>/json`, the upload API at `/` and `legacy/`,
and the maintenance calls: `POST pypi/<project>/<version>/yank` and `.../unyank`, `DELETE
pypi/<project>/<version>/` and `DELETE files/<project>/<filename>`. Permissions are checked here
for a fast refusal and again by core on every write, with ownership.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from typing import Any

from aiohttp import web

from batlehub.api import (
    BadRequest,
    BatleHubError,
    BlobMissing,
    MethodNotAllowed,
    NotFound,
    PackagePage,
    RegistryServices,
    RegistrySettings,
    Rendered,
    UpstreamDocument,
    actor,
    base_url,
    content_etag,
    etag_matches,
    read_json,
    registry_url,
    require,
    respond,
    revision_etag,
)
from batlehub_pypi import pages, simple, web_page
from batlehub_pypi.local import METADATA_SUFFIX, LocalProjects, Upload, file_exists
from batlehub_pypi.names import (
    check_safe_filename,
    file_version,
    normalize_name,
    normalize_version,
    parse_filename,
)
from batlehub_pypi.options import PypiOptions
from batlehub_pypi.upload import MAX_CORE_METADATA_BYTES, check_upload, read_form
from batlehub_pypi.upstream import UpstreamIndex

log = logging.getLogger(__name__)
VARY = "Accept, Accept-Encoding"
PAGE_MEMO_ENTRIES = 256
"""Rendered package pages of local projects a process remembers (a reStructuredText README takes
docutils milliseconds to render)."""
PROJECT_LIST_LIMIT = 100_000
METADATA_TYPE = "text/plain; charset=utf-8"
STALE_WARNING = '110 batlehub "served stale: upstream unavailable"'
JSON_TYPE = "application/json"
JSON_VARIANT = "pypi-json"
"""The JSON API's variant in rendered-cache keys and ETags (with the release, for one release)."""
JSON_BYTES_PER_FILE = 600


class PypiRegistry:
    """A configured PyPI registry (implements `batlehub.api.Registry`)."""

    def __init__(self, settings: RegistrySettings, services: RegistryServices) -> None:
        self.name = settings.name
        self.services = services
        self.options = settings.validated_options(PypiOptions)
        self.mode = self.options.mode
        self.local = LocalProjects(services.packages, services.policy)
        self.artifacts = services.artifacts
        self.rendered = services.rendered_cache()
        self._pages: dict[tuple[str | None, ...], PackagePage] = {}
        self.upstream: UpstreamIndex | None = None
        if self.mode != "local" and self.options.upstreams:
            self.upstream = UpstreamIndex(
                services,
                upstreams=list(self.options.upstreams),
                files_hosts=list(self.options.files_hosts),
                metadata_ttl_secs=self.options.cache.metadata_ttl_secs,
                serve_stale=self.options.cache.serve_stale,
                guard_publishes=self.mode == "hybrid",
            )

    # --- Registry protocol ----------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application()
        r = app.router
        r.add_post("/", self.upload)
        r.add_post("/legacy/", self.upload)
        r.add_post("/legacy", self.upload)
        r.add_get("/simple/", self.project_list)
        r.add_get("/simple", self.redirect_to_slash)
        r.add_get("/simple/{project}/", self.project_page)
        r.add_get("/simple/{project}", self.redirect_to_slash)
        r.add_get("/files/{project}/{filename}", self.download)
        r.add_delete("/files/{project}/{filename}", self.delete_file)
        r.add_get("/pypi/{project}/json", self.project_json)
        r.add_get("/pypi/{project}/{version}/json", self.release_json)
        r.add_post("/pypi/{project}/{version}/yank", self.yank)
        r.add_post("/pypi/{project}/{version}/unyank", self.unyank)
        r.add_delete("/pypi/{project}/{version}/", self.delete_release)
        r.add_delete("/pypi/{project}/{version}", self.delete_release)
        return app

    async def startup(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    # --- plumbing -------------------------------------------------------------------------------

    def _not_found(self, project: str) -> NotFound:
        return NotFound(f"project {project} not found in registry {self.name!r}")

    def _respond(
        self, request: web.Request, rendered: Rendered, extra: Mapping[str, str] | None = None
    ) -> web.StreamResponse:
        return respond(request, rendered, {"Vary": VARY, **(extra or {})})

    def _content_type(self, request: web.Request) -> str:
        chosen = simple.negotiate(request.headers.get("Accept"), request.query.get("format"))
        if chosen is None:
            raise _NotAcceptable(
                f"this index serves {simple.JSON_V1}, {simple.HTML_V1} and {simple.TEXT_HTML}",
            )
        return chosen

    async def _upstream_page(self, project: str) -> UpstreamDocument | None:
        if self.upstream is None:
            return None
        return await self.upstream.page(project)

    # --- the simple index -----------------------------------------------------------------------

    async def redirect_to_slash(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently(location=request.rel_url.path + "/" + _query(request))

    async def project_list(self, request: web.Request) -> web.StreamResponse:
        require(request, "releases:read")
        content_type = self._content_type(request)
        hits, _ = await self.services.packages.search("", PROJECT_LIST_LIMIT, 0)
        names = {h.name for h in hits}
        if self.upstream is not None:
            names.update(await self.upstream.documents.known_names("", PROJECT_LIST_LIMIT, names))
        body = simple.render_project_list(names, content_type, registry_url(request) + "/simple/")
        return self._respond(request, Rendered.of(body, content_etag(body), content_type))

    async def project_page(self, request: web.Request) -> web.StreamResponse:
        require(request, "releases:read")
        raw = request.match_info["project"]
        project = normalize_name(raw)
        if raw != project:  # PEP 503: one URL per project
            location = registry_url(request) + f"/simple/{project}/" + _query(request)
            raise web.HTTPMovedPermanently(location=location)
        content_type = self._content_type(request)
        base = base_url(request)
        stamp = await self.local.stamp(project)
        if stamp is not None:
            etag = revision_etag(stamp, content_type, base)
            if etag_matches(request.headers.get("If-None-Match"), etag):  # no database read
                return web.Response(status=304, headers={"ETag": etag, "Cache-Control": "no-cache", "Vary": VARY})
            rendered = self.rendered.get((project, stamp, content_type, base))
            if rendered is None:
                package = await self.local.load(project)
                if package is None:
                    raise self._not_found(project)
                body = simple.render(pages.local_page(package, registry_url(request)), content_type)
                rendered = Rendered.of(body, revision_etag(package.stamp, content_type, base), content_type)
                self.rendered.put((project, package.stamp, content_type, base), rendered)
            return self._respond(request, rendered)
        doc = await self._upstream_page(project)
        if doc is None or self.upstream is None:
            raise self._not_found(project)
        upstream = self.upstream
        url = registry_url(request)

        async def render() -> Rendered:
            # Once per upstream content, form and base URL, however many clients ask meanwhile.
            page = pages.proxied_page(await upstream.data(doc), project, url)
            body = simple.render(page, content_type)
            return Rendered.of(body, content_etag(body), content_type)

        key = (project, "upstream", doc.upstream, doc.content_id, content_type, base)
        rendered = await self.rendered.get_or_render(key, render)
        return self._respond(request, rendered, {"Warning": STALE_WARNING} if doc.stale else None)

    # --- files ----------------------------------------------------------------------------------

    async def download(self, request: web.Request) -> web.StreamResponse:
        project = normalize_name(request.match_info["project"])
        filename = request.match_info["filename"]
        metadata = filename.endswith(METADATA_SUFFIX)
        # Core metadata is what resolvers read in place of the file: reading it is reading releases.
        require(request, "releases:read" if metadata else "source:read")
        dist_name = filename[: -len(METADATA_SUFFIX)] if metadata else filename
        check_safe_filename(dist_name)  # refuses odd names before they reach a lookup
        content_type = METADATA_TYPE if metadata else "application/octet-stream"
        version = file_version(dist_name)
        if version is not None:
            # Before any lookup: a withheld release's files are refused with the rule and reason,
            # never fetched from the upstream.
            await self.services.policy.require_visible(project, version, actor(request))
        stamp = await self.local.stamp(project)
        if stamp is not None:
            return await self.artifacts.local_response(
                request,
                (project, stamp, filename),
                partial(self.local.file_key, project, filename),
                filename,
                not_found=f"file {filename} of {project} not found",
                content_type=content_type,
            )
        upstream = self.upstream
        if upstream is None:
            raise self._not_found(project)
        if metadata:
            fetch = partial(upstream.metadata_key, project, dist_name)
        else:
            fetch = partial(upstream.file_key, project, filename)
        return await self.artifacts.fetched_response(request, fetch, filename, content_type=content_type)

    # --- JSON API -------------------------------------------------------------------------------

    async def _json(self, request: web.Request, version: str | None) -> web.StreamResponse:
        """A JSON API document, rendered once per revision stamp (local) or upstream content id
        (proxied; a policy view has its own), release and base URL, like the project pages."""
        require(request, "releases:read")
        project = normalize_name(request.match_info["project"])
        if version is not None:
            await self.services.policy.require_visible(project, version, actor(request))
        variant = JSON_VARIANT if version is None else f"{JSON_VARIANT} {version}"
        base = base_url(request)
        url = registry_url(request)
        stamp = await self.local.stamp(project)
        if stamp is not None:
            etag = revision_etag(stamp, variant, base)
            if etag_matches(request.headers.get("If-None-Match"), etag):  # no database read
                return web.Response(status=304, headers={"ETag": etag, "Cache-Control": "no-cache", "Vary": VARY})

            async def render_local() -> Rendered:
                made = await self._render_local_json(project, url, version)
                body, body_gzip, rendered_stamp = made
                return Rendered.of(body, revision_etag(rendered_stamp, variant, base), JSON_TYPE, body_gzip)

            # Keyed by the stamp read above; bytes of a write since then carry their own ETag.
            rendered = await self.rendered.get_or_render((project, stamp, variant, base), render_local)
            return self._respond(request, rendered)
        doc = await self._upstream_page(project)
        if doc is None or self.upstream is None:
            raise self._not_found(project)
        documents = self.upstream.documents
        if version is not None and version not in await documents.extract(doc, pages.proxied_releases, project):
            raise NotFound(f"release {version} of {project} not found")
        offload = self.services.offload

        async def render() -> Rendered:
            # Once per upstream content, release and base URL; in a worker process when big.
            body = await documents.read(doc)
            made = await offload.run(len(body), pages.render_proxied_json, body, project, url, version)
            if made is None:  # the release check above reads the same content
                raise NotFound(f"release {version} of {project} not found")
            out, out_gzip, out_etag = made
            return Rendered.of(out, out_etag, JSON_TYPE, out_gzip)

        key = (project, "upstream", doc.upstream, doc.content_id, variant, base)
        rendered = await self.rendered.get_or_render(key, render)
        return self._respond(request, rendered, {"Warning": STALE_WARNING} if doc.stale else None)

    async def _render_local_json(self, project: str, url: str, version: str | None) -> tuple[bytes, bytes | None, str]:
        rows = await self.local.store.load_rows(project)
        if rows is None:
            raise self._not_found(project)
        view = await self.services.policy.local_view(project, rows.stamp)
        # What decides where it runs: the manifests, and about this much JSON per file.
        size = rows.size + JSON_BYTES_PER_FILE * len(rows.files)
        run = self.services.offload.run
        made = await run(size, pages.render_local_json, rows, url, version, view.hidden, view.digest)
        if made is None:
            raise NotFound(f"release {version} of {project} not found")
        return made

    async def project_json(self, request: web.Request) -> web.StreamResponse:
        return await self._json(request, None)

    async def release_json(self, request: web.Request) -> web.StreamResponse:
        return await self._json(request, normalize_version(request.match_info["version"]))

    # --- the web UI ---------------------------------------------------------------------------

    async def package_page(self, request: web.Request, name: str, version: str | None) -> PackagePage:
        """The web UI's page of a project (core checked the caller may read this registry)."""
        project = normalize_name(name)
        url = registry_url(request, self.name)
        stamp = await self.local.stamp(project)
        if stamp is not None:
            memo = (project, stamp, version, url)
            found = self._pages.get(memo)
            if found is None:
                package = await self.local.load(project)
                if package is None:
                    raise self._not_found(project)
                size = sum(len(str(v.manifest.get("metadata", {}).get("description", ""))) for v in package.versions)
                found = await self.services.offload.run(size, web_page.local_page, package, url, version)
                if len(self._pages) >= PAGE_MEMO_ENTRIES:
                    self._pages.clear()
                self._pages[memo] = found
            return found
        doc = await self._upstream_page(project)
        if doc is None or self.upstream is None:
            raise self._not_found(project)
        page = await self.upstream.documents.extract(doc, web_page.proxied_web_page, project, url, version)
        if page is None:
            raise NotFound(f"{project} has no version {version!r}")
        page = await self._with_metadata(project, page, (doc.content_id, url))
        return replace(page, notes=(*page.notes, web_page.STALE_NOTE)) if doc.stale else page

    async def _with_metadata(self, project: str, page: PackagePage, source: tuple[str, str]) -> PackagePage:
        """The page completed from the shown release's core metadata file, fetched and verified
        as for pip; the page as it is when the upstream offers none or it cannot be had now."""
        filename = web_page.metadata_file_of(page)
        if filename is None or self.upstream is None:
            return page
        memo = (project, *source, page.version)
        found = self._pages.get(memo)
        if found is not None:
            return found
        try:
            key = await self.upstream.metadata_key(project, filename)
            data = await self.artifacts.read(key, MAX_CORE_METADATA_BYTES)
            found = await self.services.offload.run(len(data), web_page.with_metadata, page, data)
        except (BatleHubError, BlobMissing) as exc:  # none offered, upstream down, not valid metadata
            log.debug("the page of %s shows no metadata of %s: %s", project, filename, exc)
            return page
        if len(self._pages) >= PAGE_MEMO_ENTRIES:
            self._pages.clear()
        self._pages[memo] = found
        return found

    # --- writing --------------------------------------------------------------------------------

    def _refuse_writes_in_proxy_mode(self) -> None:
        if self.mode == "proxy":
            raise MethodNotAllowed(
                f"registry {self.name!r} is a read-only proxy of its upstream indexes;"
                " upload to a registry in local or hybrid mode"
            )

    async def _local_for_write(self, project: str) -> None:
        self._refuse_writes_in_proxy_mode()
        if await self.local.stamp(project) is None:
            if self.upstream is not None:
                raise MethodNotAllowed(
                    f"project {project} comes from an upstream index; only projects uploaded to"
                    f" registry {self.name!r} can be changed here"
                )
            raise self._not_found(project)

    async def upload(self, request: web.Request) -> web.StreamResponse:
        """The legacy upload API (twine, uv publish). Answers 200 with an empty body, as PyPI does."""
        require(request, "releases:publish")
        self._refuse_writes_in_proxy_mode()
        limits = self.services.settings.limits
        form = await read_form(
            request,
            self.artifacts,
            max_fields_bytes=limits.max_document_bytes,
            idle_secs=limits.body_idle_timeout_secs,
        )
        stored = []
        try:
            checked = await check_upload(form)
            if await self.local.has_file(checked.project, form.filename):
                raise file_exists(form.filename)
            assert form.spooled is not None
            blob = await self.artifacts.put_spooled(form.spooled, {"sha256": checked.file_meta["sha256"]})
            stored.append(blob)
            core = None
            if checked.core_metadata is not None:
                core = await self.artifacts.put(_once(checked.core_metadata), _digests(checked.core_metadata))
                stored.append(core)
            upload = Upload(
                project=checked.project,
                display_name=checked.display_name,
                version=checked.version,
                metadata=checked.metadata,
                filename=form.filename,
                blob=blob,
                file_meta=checked.file_meta,
                core_metadata=core,
            )
            warning = await self.local.upload(upload, actor(request))
        except BaseException:
            for blob in stored:
                self.artifacts.discard(blob)
            raise
        finally:
            form.discard()
        self.rendered.drop_package(checked.project)
        return web.Response(status=200, text="OK", headers={"X-Quota-Warning": warning} if warning else None)

    async def _release_write(self, request: web.Request, permission: str) -> tuple[str, str]:
        require(request, permission)
        project = normalize_name(request.match_info["project"])
        await self._local_for_write(project)
        return project, normalize_version(request.match_info["version"])

    async def yank(self, request: web.Request) -> web.StreamResponse:
        project, version = await self._release_write(request, "releases:publish")
        body = await read_json(request, default={})
        reason = body.get("reason", "") if isinstance(body, dict) else None
        if not isinstance(reason, str):
            raise BadRequest('the body is optional JSON {"reason": "why"}')
        await self.local.set_yanked(project, version, reason, actor(request))
        self.rendered.drop_package(project)
        return web.json_response({"ok": True, "project": project, "version": version, "yanked": True})

    async def unyank(self, request: web.Request) -> web.StreamResponse:
        project, version = await self._release_write(request, "releases:publish")
        await self.local.set_yanked(project, version, None, actor(request))
        self.rendered.drop_package(project)
        return web.json_response({"ok": True, "project": project, "version": version, "yanked": False})

    async def delete_release(self, request: web.Request) -> web.StreamResponse:
        project, version = await self._release_write(request, "releases:delete")
        await self.local.remove_release(project, version, actor(request))
        self.rendered.drop_package(project)
        return web.json_response({"ok": True, "project": project, "version": version})

    async def delete_file(self, request: web.Request) -> web.StreamResponse:
        require(request, "releases:delete")
        project = normalize_name(request.match_info["project"])
        filename = request.match_info["filename"]
        parse_filename(filename)
        await self._local_for_write(project)
        await self.local.remove_file(project, filename, actor(request))
        self.rendered.drop_package(project)
        return web.json_response({"ok": True, "project": project, "filename": filename})


class _NotAcceptable(BadRequest):
    status = 406


def _query(request: web.Request) -> str:
    return f"?{request.query_string}" if request.query_string else ""


async def _once(data: bytes) -> Any:
    yield data


def _digests(data: bytes) -> dict[str, str]:
    return {"sha512": hashlib.sha512(data).hexdigest()}
