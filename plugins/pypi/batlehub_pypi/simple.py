"""The simple repository API's documents: project pages and the project list, in PEP 503 HTML and
PEP 691 JSON, and upstream project pages read back in either form.

One shape carries a project page between the two sources (local projects, upstream pages) and the
two renderings: a dict shaped like a PEP 691 JSON page, `{"name", "versions", "files": [...]}`,
each file `{"filename", "url", "hashes", "requires-python", "core-metadata", "yanked", "size",
"upload-time"}` (only `filename`, `url` and `hashes` always present). Rendering adds what each
form needs: `meta.api-version` 1.1 (PEP 700), the PEP 714 and PEP 658 metadata keys side by side,
`#sha256=` fragments and `data-*` attributes in HTML.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from html.parser import HTMLParser
from typing import Any

from batlehub.api import BadRequest
from batlehub_pypi.names import parse_filename, version_key

JSON_V1 = "application/vnd.pypi.simple.v1+json"
HTML_V1 = "application/vnd.pypi.simple.v1+html"
TEXT_HTML = "text/html"
API_VERSION = "1.1"
"""1.1: PEP 700's `versions`, `size` and `upload-time` are present."""

_ALIASES = {
    JSON_V1: JSON_V1,
    "application/vnd.pypi.simple.latest+json": JSON_V1,
    HTML_V1: HTML_V1,
    "application/vnd.pypi.simple.latest+html": HTML_V1,
    TEXT_HTML: TEXT_HTML,
}
_FORMAT_PARAM = {"json": JSON_V1, "html": HTML_V1}
UPSTREAM_ACCEPT = f"{JSON_V1}, {HTML_V1}; q=0.2, {TEXT_HTML}; q=0.01"
"""What the hub asks upstream indexes for: JSON when they have it, HTML otherwise."""


def negotiate(accept: str | None, format_param: str | None = None) -> str | None:
    """The content type to answer with (PEP 691): the client's most preferred of the JSON and
    HTML forms, HTML when it says nothing, None (406) when it accepts neither. `?format=json`
    or `?format=html` overrides the header."""
    if format_param:
        return _FORMAT_PARAM.get(format_param.lower())
    if not accept or not accept.strip():
        return TEXT_HTML
    best: tuple[float, int, str] | None = None
    for position, part in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        media = media.lower()
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality <= 0:
            continue
        if media in ("*/*", "application/*", "text/*"):
            chosen = TEXT_HTML if media != "application/*" else JSON_V1
        else:
            chosen = _ALIASES.get(media, "")
        if not chosen:
            continue
        # Equal quality: the earlier entry wins, as clients list their preference first.
        candidate = (quality, -position, chosen)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    return best[2] if best else None


# --- rendering ------------------------------------------------------------------------------------


def render_json(page: Mapping[str, Any]) -> bytes:
    files = []
    for item in page["files"]:
        out = dict(item)
        metadata = out.get("core-metadata")
        if metadata is not None:
            out["dist-info-metadata"] = metadata  # PEP 658's key, for clients older than PEP 714
        files.append(out)
    doc = {"meta": {"api-version": API_VERSION}, "name": page["name"], "versions": page["versions"], "files": files}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _metadata_attr(value: Any) -> str | None:
    if value is True:
        return "true"
    if isinstance(value, Mapping) and value:
        algorithm, digest = next(iter(value.items()))
        return f"{algorithm}={digest}"
    return None


def render_html(page: Mapping[str, Any], *, any_digest: bool = False) -> bytes:
    """The PEP 503 page. A link's `#fragment` is its sha256, or with `any_digest` whichever one
    digest the file has (to write back an upstream's page as it was read)."""
    name = html.escape(str(page["name"]))
    lines = [
        "<!DOCTYPE html>",
        "<html>",
        "  <head>",
        f'    <meta name="pypi:repository-version" content="{API_VERSION}">',
        f"    <title>Links for {name}</title>",
        "  </head>",
        "  <body>",
        f"    <h1>Links for {name}</h1>",
    ]
    for item in page["files"]:
        url = item["url"]
        hashes = item.get("hashes") or {}
        if "sha256" in hashes:
            url += "#sha256=" + hashes["sha256"]
        elif any_digest and hashes:
            algorithm, digest = next(iter(hashes.items()))
            url += f"#{algorithm}={digest}"
        attrs = [f'href="{html.escape(url)}"']
        if item.get("requires-python"):
            attrs.append(f'data-requires-python="{html.escape(item["requires-python"])}"')
        metadata = _metadata_attr(item.get("core-metadata"))
        if metadata:
            attrs.append(f'data-dist-info-metadata="{metadata}"')
            attrs.append(f'data-core-metadata="{metadata}"')
        yanked = item.get("yanked")
        if yanked:
            attrs.append(f'data-yanked="{html.escape(yanked) if isinstance(yanked, str) else ""}"')
        lines.append(f"    <a {' '.join(attrs)}>{html.escape(item['filename'])}</a><br />")
    lines += ["  </body>", "</html>", ""]
    return "\n".join(lines).encode()


def render(page: Mapping[str, Any], content_type: str) -> bytes:
    return render_json(page) if content_type == JSON_V1 else render_html(page)


def render_project_list(names: Iterable[str], content_type: str, base: str) -> bytes:
    """The `/simple/` page; `base` is the simple index's URL (with its trailing slash)."""
    ordered = sorted(set(names))
    if content_type == JSON_V1:
        doc = {"meta": {"api-version": API_VERSION}, "projects": [{"name": n} for n in ordered]}
        return json.dumps(doc, separators=(",", ":")).encode()
    lines = [
        "<!DOCTYPE html>",
        "<html>",
        "  <head>",
        f'    <meta name="pypi:repository-version" content="{API_VERSION}">',
        "    <title>Simple index</title>",
        "  </head>",
        "  <body>",
    ]
    lines += [f'    <a href="{html.escape(base + n)}/">{html.escape(n)}</a><br />' for n in ordered]
    lines += ["  </body>", "</html>", ""]
    return "\n".join(lines).encode()


def sorted_versions(versions: Iterable[str]) -> list[str]:
    return sorted(set(versions), key=version_key)


# --- reading upstream pages -----------------------------------------------------------------------


def parse_project_page(body: bytes) -> dict[str, Any]:
    """An upstream project page, JSON or HTML (told apart by their first byte, since the parser
    sees the bytes only), in the shape above with each `url` as the upstream wrote it (maybe
    relative to the page). `ValueError` when it is neither."""
    start = body.lstrip()[:1]
    if start == b"{":
        return _parse_json_page(body)
    if start == b"<":
        return _parse_html_page(body)
    raise ValueError("the answer is neither a PEP 691 JSON nor a PEP 503 HTML project page")


def _hashes(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k).lower(): str(v).lower() for k, v in value.items() if isinstance(v, str)}


def _metadata_value(value: Any) -> bool | dict[str, str] | None:
    if value is True:
        return True
    if isinstance(value, Mapping):
        hashes = _hashes(value)
        return hashes or True
    return None


def _parse_json_page(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise ValueError("a JSON project page has a files list")
    files = []
    for raw in data["files"]:
        if (
            not isinstance(raw, Mapping)
            or not isinstance(raw.get("filename"), str)
            or not isinstance(raw.get("url"), str)
        ):
            continue
        item: dict[str, Any] = {"filename": raw["filename"], "url": raw["url"], "hashes": _hashes(raw.get("hashes"))}
        if isinstance(raw.get("requires-python"), str):
            item["requires-python"] = raw["requires-python"]
        metadata = _metadata_value(raw.get("core-metadata", raw.get("dist-info-metadata")))
        if metadata is not None:
            item["core-metadata"] = metadata
        yanked = raw.get("yanked")
        if yanked is True or (isinstance(yanked, str) and yanked):
            item["yanked"] = yanked
        if isinstance(raw.get("size"), int) and not isinstance(raw.get("size"), bool):
            item["size"] = raw["size"]
        if isinstance(raw.get("upload-time"), str):
            item["upload-time"] = raw["upload-time"]
        files.append(item)
    name = data.get("name") if isinstance(data.get("name"), str) else ""
    versions = data.get("versions")
    page = {"name": name, "files": files}
    if isinstance(versions, list) and all(isinstance(v, str) for v in versions):
        page["versions"] = versions
    return page


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[dict[str, str | None], list[str]]] = []
        self._open: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._open = []
            self.links.append((dict(attrs), self._open))

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._open.append(data)


def _attr_metadata(value: str | None) -> bool | dict[str, str] | None:
    if value is None:
        return None
    algorithm, sep, digest = value.partition("=")
    if sep and algorithm and digest:
        return {algorithm.lower(): digest.lower()}
    return True if value.strip().lower() == "true" else None


def _parse_html_page(body: bytes) -> dict[str, Any]:
    parser = _Links()
    try:
        parser.feed(body.decode("utf-8", errors="replace"))
        parser.close()
    except Exception as exc:  # HTMLParser raises assorted errors on garbage
        raise ValueError(f"not an HTML page: {exc}") from None
    files = []
    for attrs, text in parser.links:
        href = attrs.get("href")
        if not href:
            continue
        url, _, fragment = href.partition("#")
        filename = "".join(text).strip() or url.rsplit("/", 1)[-1]
        item: dict[str, Any] = {"filename": filename, "url": url, "hashes": {}}
        algorithm, sep, digest = fragment.partition("=")
        if sep and algorithm and digest:
            item["hashes"] = {algorithm.lower(): digest.lower()}
        if attrs.get("data-requires-python"):
            item["requires-python"] = attrs["data-requires-python"]
        metadata = _attr_metadata(attrs.get("data-core-metadata", attrs.get("data-dist-info-metadata")))
        if metadata is not None:
            item["core-metadata"] = metadata
        if "data-yanked" in attrs:
            item["yanked"] = attrs["data-yanked"] or True
        files.append(item)
    return {"name": "", "files": files}


def page_versions(files: Sequence[Mapping[str, Any]]) -> list[str]:
    """The versions a page's files name (for pages without PEP 700's `versions`)."""
    found = set()
    for item in files:
        try:
            found.add(parse_filename(item["filename"]).version)
        except BadRequest:
            continue
    return sorted_versions(found)


__all__ = [
    "HTML_V1",
    "JSON_V1",
    "TEXT_HTML",
    "UPSTREAM_ACCEPT",
    "negotiate",
    "page_versions",
    "parse_project_page",
    "render",
    "render_project_list",
]
