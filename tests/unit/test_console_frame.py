"""The console's frame on loopback: a page needs a session, a form needs this session's CSRF
token before anything reaches the API, and the API's answer (a refusal included) is what the
browser gets. ``/v1`` is a stub that records what it was asked."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.gateway.api.deps import STORE
from services.gateway.console import mount_console
from services.gateway.console.session import COOKIE, LOGIN_COOKIE, Session, new_session

TOKENS = {"dvm_admin": "admin", "dvm_viewer": "viewer"}


class _Tokens:
    """The one store call the console makes: who holds a token."""

    async def token_by_secret(self, secret: str) -> dict[str, Any] | None:
        role = TOKENS.get(secret)
        return None if role is None else {"_id": f"t-{role}", "name": role, "role": role}


async def _stub_v1(calls: list[tuple[str, str, str]]) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        calls.append((request.method, request.path, auth))
        token = auth.removeprefix("Bearer ")
        if token not in TOKENS:
            return web.json_response({"title": "Unauthorized", "status": 401}, status=401)
        if request.method == "POST" and TOKENS[token] == "viewer":
            detail = "role viewer may not stop a machine"
            return web.json_response({"status": 403, "detail": detail}, status=403)
        return web.json_response({"items": [], "next": None}, status=200)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest.fixture
async def console() -> AsyncIterator[tuple[TestClient, list[tuple[str, str, str]]]]:
    calls: list[tuple[str, str, str]] = []
    api = TestServer(await _stub_v1(calls))
    await api.start_server()
    app = web.Application()
    app[STORE] = _Tokens()  # type: ignore[assignment]
    mount_console(app, str(api.make_url("")).rstrip("/"))
    async with TestClient(TestServer(app)) as client:
        yield client, calls
    await api.close()


def _cookie(session: Session) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={session.cookie}"}


async def test_a_page_without_a_session_sends_the_browser_to_the_login_page(console):
    client, calls = console

    resp = await client.get("/ui/machines?app=web", allow_redirects=False)

    assert resp.status == 303
    location = urlsplit(resp.headers["Location"])
    assert (location.path, parse_qs(location.query)) == (
        "/ui/login", {"next": ["/ui/machines?app=web"]})  # fmt: skip
    assert calls == []


@pytest.mark.parametrize("csrf", [None, "", "forged", "other-session"])
async def test_a_form_without_this_sessions_csrf_token_never_reaches_the_api(console, csrf):
    client, calls = console
    session = new_session("dvm_admin")
    form = {"action": "stop"}
    if csrf is not None:
        form["csrf"] = new_session("dvm_admin").csrf if csrf == "other-session" else csrf

    resp = await client.post("/ui/machines/m-1/action", data=form, headers=_cookie(session))

    assert resp.status == 403
    assert "CSRF" in await resp.text()
    assert calls == []


async def test_a_viewers_post_with_its_own_csrf_token_is_refused_by_the_api(console):
    client, calls = console
    session = new_session("dvm_viewer")

    resp = await client.post(
        "/ui/machines/m-1/action", data={"action": "stop", "csrf": session.csrf},
        headers=_cookie(session), allow_redirects=False,
    )  # fmt: skip

    assert resp.status == 403
    assert "role viewer may not stop a machine" in await resp.text()
    assert calls == [("POST", "/v1/machines/m-1/stop", "Bearer dvm_viewer")]


async def test_an_admins_post_goes_to_the_api_and_back_to_the_machine(console):
    client, calls = console
    session = new_session("dvm_admin")

    resp = await client.post(
        "/ui/machines/m-1/action", data={"action": "stop", "csrf": session.csrf},
        headers=_cookie(session), allow_redirects=False,
    )  # fmt: skip

    assert resp.status == 303
    assert resp.headers["Location"] == "/ui/machines/m-1?msg=stop+requested"
    assert calls == [("POST", "/v1/machines/m-1/stop", "Bearer dvm_admin")]


async def test_login_needs_the_forms_nonce_and_a_token_the_api_takes(console):
    client, calls = console
    form = await client.get("/ui/login")
    nonce = form.cookies[LOGIN_COOKIE].value

    no_nonce = await client.post(
        "/ui/login", data={"token": "dvm_admin", "csrf": "x"}, allow_redirects=False
    )
    bad = await client.post(
        "/ui/login", data={"token": "dvm_nope", "csrf": nonce}, allow_redirects=False
    )
    good = await client.post(
        "/ui/login", data={"token": "dvm_admin", "csrf": nonce, "next": "//evil.example/"},
        allow_redirects=False,
    )  # fmt: skip

    assert no_nonce.status == 403
    assert bad.status == 303 and bad.headers["Location"].startswith("/ui/login?error=")
    assert good.status == 303 and good.headers["Location"] == "/ui/"
    cookie = good.cookies[COOKIE]
    assert cookie.value.endswith(".dvm_admin")
    assert (cookie["httponly"], cookie["samesite"], cookie["path"]) == (True, "Strict", "/ui")
    assert [c[2] for c in calls] == ["Bearer dvm_nope", "Bearer dvm_admin"]
