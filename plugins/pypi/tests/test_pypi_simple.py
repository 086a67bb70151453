"""Reading upstream project pages (PEP 503 HTML and PEP 691 JSON, as real and hostile indexes
write them), choosing the answer's form from `Accept`, and what a proxied page offers."""

from __future__ import annotations

import pytest
from batlehub_pypi.pages import proxied_page
from batlehub_pypi.simple import HTML_V1, JSON_V1, TEXT_HTML, negotiate, parse_project_page
from batlehub_pypi.upstream import file_url

SHA = "ab" * 32


def test_an_html_page_with_relative_links_attributes_and_entities() -> None:
    page = parse_project_page(
        f"""<!DOCTYPE html><html><body>
        <a href="../../packages/demo-1.0.tar.gz#sha256={SHA}" data-requires-python="&gt;=3.8">demo-1.0.tar.gz</a>
        <a href="/files/demo-1.0-py3-none-any.whl#sha256={SHA}" data-core-metadata="sha256={SHA}"
           data-yanked="">demo-1.0-py3-none-any.whl</a>
        <a href="demo-0.9.zip" data-dist-info-metadata="true" data-yanked="bad release">demo-0.9.zip</a>
        </body></html>""".encode()
    )
    sdist, wheel, old = page["files"]
    assert sdist == {
        "filename": "demo-1.0.tar.gz",
        "url": "../../packages/demo-1.0.tar.gz",
        "hashes": {"sha256": SHA},
        "requires-python": ">=3.8",
    }
    assert wheel["core-metadata"] == {"sha256": SHA} and wheel["yanked"] is True
    assert old["hashes"] == {} and old["core-metadata"] is True and old["yanked"] == "bad release"

    upstream = "http://up.test:8/simple/"
    assert file_url(upstream, "demo", sdist) == "http://up.test:8/packages/demo-1.0.tar.gz"
    assert file_url(upstream, "demo", wheel) == "http://up.test:8/files/demo-1.0-py3-none-any.whl"
    assert file_url(upstream, "demo", old) == "http://up.test:8/simple/demo/demo-0.9.zip"


def test_a_json_page_keeps_pep_700_fields_and_drops_malformed_entries() -> None:
    page = parse_project_page(
        b'{"meta": {"api-version": "1.1"}, "name": "Demo", "versions": ["1.0"], "files": ['
        b'{"filename": "demo-1.0.tar.gz", "url": "https://files.test/d.tgz", "hashes": {"SHA256": "AB"},'
        b' "size": 10, "upload-time": "2024-01-01T00:00:00Z", "yanked": false, "requires-python": ""},'
        b'{"filename": 7, "url": "x"}, "junk"]}'
    )
    assert page["name"] == "Demo" and page["versions"] == ["1.0"]
    (item,) = page["files"]
    assert item["hashes"] == {"sha256": "ab"} and item["size"] == 10 and "yanked" not in item


@pytest.mark.parametrize("body", [b"", b"plain text", b"[1, 2]", b'{"files": "no"}', b"{not json"])
def test_what_is_not_a_project_page_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        parse_project_page(body)


def test_a_proxied_page_offers_only_what_the_hub_can_verify_and_name() -> None:
    data = {
        "name": "demo",
        "files": [
            {"filename": "demo-1.0-py3-none-any.whl", "url": "a", "hashes": {"sha256": SHA}, "core-metadata": True},
            {
                "filename": "demo-1.1-py3-none-any.whl",
                "url": "b",
                "hashes": {"sha256": SHA},
                "core-metadata": {"md5": "x"},
            },
            {"filename": "demo-1.2.tar.bz2", "url": "c", "hashes": {"sha256": SHA}},
            {"filename": "../../etc/passwd", "url": "d", "hashes": {}},
        ],
    }
    page = proxied_page(data, "demo", "http://hub.test/registries/py")
    assert [f["filename"] for f in page["files"]] == [
        "demo-1.0-py3-none-any.whl",
        "demo-1.1-py3-none-any.whl",
        "demo-1.2.tar.bz2",
    ]
    assert all("core-metadata" not in f for f in page["files"])  # unverifiable: not offered
    assert page["files"][0]["url"] == "http://hub.test/registries/py/files/demo/demo-1.0-py3-none-any.whl"
    assert page["versions"] == ["1.0", "1.1"]


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, TEXT_HTML),
        ("*/*", TEXT_HTML),
        (f"{JSON_V1}, {HTML_V1}; q=0.1, text/html; q=0.01", JSON_V1),
        (f"text/html, {JSON_V1}; q=0.5", TEXT_HTML),
        ("application/vnd.pypi.simple.latest+json", JSON_V1),
        (f"{HTML_V1}", HTML_V1),
        (f"{JSON_V1}; q=0, text/html", TEXT_HTML),
        ("application/xml", None),
    ],
)
def test_negotiation_follows_pep_691(accept: str | None, chosen: str | None) -> None:
    assert negotiate(accept) == chosen
