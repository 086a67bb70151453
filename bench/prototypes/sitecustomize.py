"""Measurement-only prototype of the tarball-path optimizations proposed in bench/README.md.

Loaded into a hub process only when the benchmark is run with
`--hub-env PYTHONPATH=bench/prototypes` (Python imports `sitecustomize` at start-up). It patches
three things at run time, so the numbers can be compared with the unpatched hub in one sitting,
without touching the npm plugin's files:

1. the tarball response opens and stats the blob in the event loop (a page-cached local file
   opens in microseconds) instead of aiohttp's FileResponse hopping to the thread pool for
   open+stat and again for close, and never probes for `.gz`/`.br` siblings of the blob;
2. the artifact key of a local version is remembered per (package, revision stamp, version), so a
   tarball request costs no database query (a new revision, e.g. an unpublish, changes the key);
3. a proxied blob once found stored is remembered (content-addressed blobs never change), so a
   tarball request costs neither a database query nor a storage stat.

If the patched modules are missing or changed shape, nothing is patched and a line on stderr says so.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def _install() -> None:
    import aiohttp.web as web

    try:
        from batlehub_npm import registry as npm_registry
        from batlehub_npm import upstream as npm_upstream
    except ImportError as exc:
        print(f"bench prototype: not patching ({exc})", file=sys.stderr)
        return

    class InlineFileResponse(web.FileResponse):
        async def prepare(self, request: Any) -> Any:
            conditional = request.headers.keys() & {"If-None-Match", "If-Match", "If-Modified-Since", "If-Range"}
            if conditional:
                return await super().prepare(request)
            try:
                # Deliberately blocking: opening a page-cached local file costs less than a thread hop.
                fobj = open(self._path, "rb")  # noqa: ASYNC230
            except OSError:
                return await super().prepare(request)
            try:
                st = os.fstat(fobj.fileno())
                return await self._prepare_open_file(request, fobj, st, None)
            finally:
                fobj.close()

    original_serve_blob = npm_registry.NpmRegistry._serve_blob

    async def serve_blob(self: Any, request: Any, key: str, filename: str) -> Any:
        path = self.services.storage.local_path(key)
        if path is None:
            return await original_serve_blob(self, request, key, filename)
        headers = {
            "Content-Type": "application/octet-stream",
            "Cache-Control": "public, max-age=31536000, immutable",
            "Content-Disposition": f'attachment; filename="{filename}"',
        }
        return InlineFileResponse(path, headers=headers)

    keys: dict[tuple[str, str, str, str], str | None] = {}
    original_artifact_key = npm_registry.NpmRegistry.get_tarball

    async def get_tarball(self: Any, request: Any, route: Any) -> Any:
        from batlehub.auth import require

        require(request, "source:read")
        package = route.package
        version = route.version
        stamp = await self._is_local(package)
        if stamp is None:
            key = await self._proxied_tarball(package, version)
        else:
            memo = (self.name, package.name, stamp, version)
            key = keys.get(memo)
            if key is None:
                key = await self.local.artifact_key(package, version)
                if key is None:
                    return await original_artifact_key(self, request, route)
                if len(keys) > 100_000:
                    keys.clear()
                keys[memo] = key
        return await self._serve_blob(request, key, route.filename or package.tarball_filename(version))

    ready: set[str] = set()
    original_blob_ready = npm_upstream.UpstreamProxy._blob_ready

    async def blob_ready(self: Any, key: str) -> bool:
        if key in ready:
            return True
        found = await original_blob_ready(self, key)
        if found:
            ready.add(key)
        return bool(found)

    npm_registry.NpmRegistry._serve_blob = serve_blob
    npm_registry.NpmRegistry.get_tarball = get_tarball
    npm_upstream.UpstreamProxy._blob_ready = blob_ready
    print("bench prototype: tarball path patched (inline open, key and blob memos)", file=sys.stderr)


_install()
