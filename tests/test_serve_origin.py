"""fd serve refuses web pages from other origins and DNS-rebinding Host names (cross-site WebSocket hijacking),
on the WebSocket and the HTTP API, and still serves its own page, programs without Origin and --allow-origin."""
from __future__ import annotations

import aiohttp
import pytest

from flashdreams_cli.serve.origin import host_ok, origin_ok
from test_serve import run, serving, toy_spec


@pytest.mark.parametrize("origin, host, allowed, ok", [
    (None, "127.0.0.1:8188", (), True),                                 # a program, not a page
    ("http://127.0.0.1:8188", "127.0.0.1:8188", (), True),              # the server's own page
    ("http://LOCALHOST:8188", "localhost:8188", (), True),
    ("http://localhost", "localhost:80", (), True),
    ("http://evil.example", "127.0.0.1:8188", (), False),
    ("http://127.0.0.1:9999", "127.0.0.1:8188", (), False),             # another local port is another origin
    ("null", "127.0.0.1:8188", (), False),                              # sandboxed frame, file://
    ("https://my.app", "127.0.0.1:8188", ("https://my.app",), True),
    ("https://my.app.evil", "127.0.0.1:8188", ("https://my.app",), False),
])
def test_origin_rule(origin, host, allowed, ok):
    assert origin_ok(origin, host, allowed) is ok


@pytest.mark.parametrize("host, bound, ok", [
    ("127.0.0.1:8188", "127.0.0.1", True), ("localhost:8188", "127.0.0.1", True), ("[::1]:8188", "::1", True),
    ("evil.example:8188", "127.0.0.1", False), ("127.0.0.1.evil.example", "127.0.0.1", False),
    (None, "127.0.0.1", False), ("127.0.0.1:notaport", "127.0.0.1", False),
    ("anything:8188", "0.0.0.0", True),
])
def test_host_rule(host, bound, ok):
    assert host_ok(host, bound) is ok


def test_other_origins_and_rebinding_hosts_get_403_own_page_works(tmp_path):
    spec = toy_spec(tmp_path, blocks=1)

    async def go():
        async with serving(spec, allow_origins=("https://my.app",)) as (server, url):
            own = url
            async with aiohttp.ClientSession() as http:
                for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                                {"Host": f"evil.example:{server.port}"},
                                {"Host": f"evil.example:{server.port}", "Origin": f"http://evil.example:{server.port}"}):
                    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                        await http.ws_connect(url + "/ws", headers=headers)
                    assert e.value.status == 403, headers
                    for path in ("/metrics", "/healthz", "/"):
                        async with http.get(url + path, headers=headers) as r:
                            assert r.status == 403, (path, headers)
                assert not server.connections                      # nothing got as far as a session
                for origin in (own, "https://my.app", None):
                    headers = {"Origin": origin} if origin else {}
                    async with http.ws_connect(url + "/ws", headers=headers) as ws:
                        hello = await ws.receive_json(timeout=5)
                        assert hello["type"] == "hello" and hello["spec"] == "toy_stream"
                async with http.get(url + "/", headers={"Origin": own}) as r:
                    assert r.status == 200 and "<html" in (await r.text()).lower()
    run(go())
