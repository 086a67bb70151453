"""READMEs as safe HTML: Markdown rendered by markdown-it-py, then sanitized by nh3.

A README is written by whoever published the package, here or on an upstream registry, so it is
hostile until cleaned: no script, no event handler, no style, no form, no frame, no link to a
`javascript:` (or any other non-web) URL. Images from outside the hub are dropped: fetching them
would tell a third party who reads which package, and the page's Content-Security-Policy would
refuse them anyway; only inline raster images (`data:image/png` and the like) stay. Relative
links point into the package's own files, which the hub does not serve as pages: they lose
their target and keep their text.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict

import nh3
from markdown_it import MarkdownIt

MAX_README_CHARS = 512 * 1024
"""Past this a README is cut: rendering megabytes would hold the event loop for everyone."""
MEMO_ENTRIES = 256

_TAGS = set(nh3.ALLOWED_TAGS) - {"area", "map"}
_ATTRIBUTES: dict[str, set[str]] = {
    **{tag: set(attrs) for tag, attrs in nh3.ALLOWED_ATTRIBUTES.items()},
    "a": {"href", "title"},
    "img": {"src", "alt", "title", "width", "height"},
    "th": {"align", "colspan", "rowspan", "scope"},
    "td": {"align", "colspan", "rowspan"},
    "code": {"class"},
}
_INLINE_IMAGE = re.compile(r"^data:image/(png|gif|jpeg|webp);base64,[A-Za-z0-9+/=\s]+$", re.IGNORECASE)
_WEB_LINK = re.compile(r"^(https?://|mailto:|#)", re.IGNORECASE)
_CODE_CLASS = re.compile(r"^language-[\w+-]{1,40}$")

_markdown = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
_memo: OrderedDict[str, str] = OrderedDict()


def _attribute(tag: str, name: str, value: str) -> str | None:
    if tag == "img" and name == "src":
        return value if _INLINE_IMAGE.match(value) else None
    if tag == "a" and name == "href":
        return value if _WEB_LINK.match(value.strip()) else None
    if tag == "code" and name == "class":
        return value if _CODE_CLASS.match(value) else None
    return value


def sanitize(html: str) -> str:
    """`html` with only harmless tags, attributes and URLs left (see the module docstring)."""
    return nh3.clean(
        html,
        tags=_TAGS,
        clean_content_tags={"script", "style"},
        attributes=_ATTRIBUTES,
        attribute_filter=_attribute,
        url_schemes={"http", "https", "mailto", "data"},
        link_rel="noopener noreferrer nofollow ugc",
        strip_comments=True,
    )


def render_readme(text: str, markup: str = "markdown") -> str:
    """A README as sanitized HTML: Markdown rendered, HTML a format rendered from its own markup,
    or plain text in a `<pre>`."""
    if not text:
        return ""
    cut = len(text) > MAX_README_CHARS
    text = text[:MAX_README_CHARS]
    key = hashlib.sha256(f"{markup}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()
    html = _memo.get(key)
    if html is not None:
        _memo.move_to_end(key)
        return html
    if markup == "markdown":
        html = sanitize(_markdown.render(text))
    elif markup == "html":
        html = sanitize(text)
    else:
        html = "<pre>" + nh3.clean_text(text) + "</pre>"
    if cut:
        html += "<p><em>(The README is longer than this; the rest is not shown.)</em></p>"
    _memo[key] = html
    while len(_memo) > MEMO_ENTRIES:
        _memo.popitem(last=False)
    return html
