"""A first end-to-end check: a real mitmdump with the addon, a real upstream, two callers."""

from __future__ import annotations

from tests.harness import MitmDump, client_from


def test_allowed_and_denied_callers(make_config, upstream, tmp_path):
    config = make_config(
        **{
            "knoxcall.yaml": {
                "environments": [{"name": "production"}],
                "clients": [{"name": "office", "ip_address": "127.0.0.8/29"}],
                "routes": [{"name": "api", "target_base_url": upstream.url}],
                "assignments": {"api": {"production": ["office"]}},
            }
        }
    )
    with MitmDump(config, mode=f"reverse:{upstream.url}", access_log=tmp_path / "access.jsonl") as proxy:
        with client_from("127.0.0.9") as allowed:
            r = allowed.get(proxy.url + "/x", headers={"x-knoxcall-route": "api"})
            assert r.status_code == 200
            assert r.json()["upstream"] == "main"
        with client_from("127.0.0.99") as denied:
            r = denied.get(proxy.url + "/x", headers={"x-knoxcall-route": "api"})
            assert r.status_code == 403
            assert r.json()["error"] == "IP not authorized"
            assert r.json()["ip"] == "127.0.0.99"
        proxy.wait_for_log("denied ip_not_whitelisted 127.0.0.99")
