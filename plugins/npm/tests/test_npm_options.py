"""The npm format's own config keys: every problem named by its key, so `batlehub check-config`
can list them all at once."""

from __future__ import annotations

from batlehub_npm.options import options_of, validate_options


def test_defaults_are_hybrid_without_upstreams() -> None:
    assert validate_options({}) == []
    options = options_of({})
    assert (options.mode, options.upstreams, options.metadata_ttl_secs, options.serve_stale) == (
        "hybrid",
        (),
        300.0,
        True,
    )


def test_every_problem_is_named_by_its_key() -> None:
    problems = validate_options(
        {
            "mode": "mirror",
            "upstreams": ["ftp://x"],
            "colour": "blue",
            "cache": {"foo": 1, "metadata_ttl_secs": "soon", "serve_stale": "yes", "warm_packages": ["..", "ok@1"]},
        }
    )
    assert "mode: expected one of proxy, local, hybrid, got 'mirror'" in problems
    assert "upstreams[0]: expected an http:// or https:// URL, got 'ftp://x'" in problems
    assert any(p.startswith("colour: unknown key (known: cache, mode, upstreams)") for p in problems)
    assert "cache.foo: unknown key (known: metadata_ttl_secs, serve_stale, warm_packages)" in problems
    assert any(p.startswith("cache.metadata_ttl_secs:") for p in problems)
    assert any(p.startswith("cache.serve_stale:") for p in problems)
    assert any(p.startswith("cache.warm_packages[0]:") for p in problems)
    assert any(p.startswith("cache.warm_packages[1]:") for p in problems)  # "1" is not a version


def test_a_proxy_needs_upstreams() -> None:
    assert validate_options({"mode": "proxy"}) == [
        'upstreams: required when mode = "proxy" (the upstream registry URLs to cache)'
    ]
    assert validate_options({"mode": "proxy", "upstreams": ["http://127.0.0.1:4873/"]}) == []
    assert options_of({"upstreams": ["http://a.test"]}).upstreams == ("http://a.test/",)
