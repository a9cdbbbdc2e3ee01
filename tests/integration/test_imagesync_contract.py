"""imagesync's port contracts, each run against its in-memory fake and the real adapter.

The Registry port: the fake and the real client on real Distribution registries: anonymous, with
basic auth (htpasswd) and with the bearer-token flow (a token service signing JWTs that the
registry verifies). The BlobIndex port: the fake and the index on the real MongoDB API."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import secrets
import time
import uuid
import warnings
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from libs.common.errors import DomainError
from services.imagesync.adapters import DigestMismatch, RegistryUnauthorized
from services.imagesync.domain import Manifest, digest_of
from services.imagesync.fakes import MemoryBlobIndex, MemoryRegistry
from services.imagesync.ports import BlobIndex
from services.imagesync.store import MongoBlobIndex
from tests.integration.test_imagesync_support import (
    SCHEMA2,
    client,
    http_session,
    registry_factory,
)
from tests.support.stack import free_port

__all__ = ["http_session", "registry_factory"]  # fixtures imported for pytest

USER, PASSWORD = "ops", "s3cret-pass"


def _htpasswd(path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # the only bcrypt at hand; Distribution's htpasswd wants bcrypt

        hashed = crypt.crypt(PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH))
    path.write_text(f"{USER}:{hashed}\n")
    return f"auth:\n  htpasswd:\n    realm: test\n    path: {path}\n"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """A token service as Distribution's token auth expects: basic-authenticated GET → JWT."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dockvm-test-tokens")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = root / "token-ca.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.requests: list[list[str]] = []
        self._runner: web.AppRunner | None = None

    def auth_yaml(self) -> str:
        """The registry's ``auth:`` section."""
        return (
            "auth:\n  token:\n"
            f"    realm: http://127.0.0.1:{self.port}/token\n"
            "    service: dockvm-test-registry\n    issuer: dockvm-test-issuer\n"
            f"    rootcertbundle: {self.bundle}\n"
        )

    def _jwt(self, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "RS256",
            "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": "dockvm-test-issuer",
            "sub": USER,
            "aud": "dockvm-test-registry",
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(sig)}"

    async def _token(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response({"details": "bad credentials"}, status=401)
        scopes = request.query.getall("scope", [])
        self.requests.append(scopes)
        return web.json_response({"token": self._jwt(scopes), "expires_in": 300})

    async def start(self) -> TokenService:
        """Serve ``/token`` on loopback."""
        app = web.Application()
        app.router.add_get("/token", self._token)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def token_service(tmp_path):
    svc = await TokenService(tmp_path).start()
    yield svc
    await svc.stop()


@pytest.fixture
def htpasswd_auth(tmp_path) -> str:
    return _htpasswd(tmp_path / "htpasswd")


@pytest.fixture
def token_auth(token_service) -> str:
    return token_service.auth_yaml()


@pytest.fixture(params=["memory", "anonymous", "basic", "bearer"])
async def registry(request, registry_factory, http_session, htpasswd_auth, token_auth):
    """The Registry port, as the fake or the real client (with each auth scheme)."""
    if request.param == "memory":
        return MemoryRegistry("dc1")
    auth = {"anonymous": "", "basic": htpasswd_auth, "bearer": token_auth}[request.param]
    reg = await registry_factory("dc1", "http://127.0.0.1:9/", auth_yaml=auth)
    return client(reg, http_session, *((USER, PASSWORD) if auth else ()))


async def _chunks(data: bytes, size: int = 4096):
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _repo() -> str:
    return f"contract/{uuid.uuid4().hex[:8]}"


async def _image(registry, repo: str, tag: str) -> tuple[Manifest, list[bytes]]:
    blobs = [secrets.token_bytes(30_000), json.dumps({"os": "linux"}).encode()]
    for b in blobs:
        await registry.upload_blob(repo, digest_of(b), _chunks(b), len(b))
    doc = {
        "schemaVersion": 2,
        "mediaType": SCHEMA2,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": digest_of(blobs[1]),
            "size": len(blobs[1]),
        },
        "layers": [
            {
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "digest": digest_of(blobs[0]),
                "size": len(blobs[0]),
            }
        ],
    }
    m = Manifest(SCHEMA2, json.dumps(doc).encode())
    await registry.put_manifest(repo, tag, m)
    return m, blobs


async def test_streamed_upload_roundtrips(registry):
    repo, data = _repo(), secrets.token_bytes(3 * 1024 * 1024 + 17)
    digest = digest_of(data)

    sent = await registry.upload_blob(repo, digest, _chunks(data, 65536), len(data))
    async with registry.open_blob(repo, digest) as stream:
        back = b"".join([c async for c in stream.chunks()])

    assert sent == len(data)
    assert await registry.blob_exists(repo, digest)
    assert back == data


async def test_an_upload_that_does_not_hash_to_its_digest_is_not_committed(registry):
    repo, digest = _repo(), digest_of(b"what was announced")
    with pytest.raises(DigestMismatch):
        await registry.upload_blob(repo, digest, _chunks(b"what was sent"))
    assert not await registry.blob_exists(repo, digest)


async def test_mount_needs_the_blob_in_the_other_repository(registry):
    first, second, data = _repo(), _repo(), secrets.token_bytes(1000)
    await registry.upload_blob(first, digest_of(data), _chunks(data))

    assert await registry.mount_blob(second, digest_of(data), first)
    assert await registry.blob_exists(second, digest_of(data))
    assert not await registry.mount_blob(second, digest_of(b"unknown"), first)


async def test_manifests_by_tag_and_digest_and_listings(registry):
    repo = _repo()
    m, _ = await _image(registry, repo, "v1")

    assert await registry.manifest_digest(repo, "v1") == m.digest
    assert await registry.manifest_digest(repo, m.digest) == m.digest
    assert await registry.manifest_digest(repo, "nope") is None
    assert (await registry.get_manifest(repo, "v1")).raw == m.raw
    assert await registry.tags(repo) == ["v1"]
    assert repo in await registry.catalog()


async def test_a_manifest_with_missing_blobs_is_refused(registry):
    repo = _repo()
    doc = {
        "schemaVersion": 2,
        "mediaType": SCHEMA2,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": digest_of(b"absent"),
            "size": 6,
        },
        "layers": [],
    }
    with pytest.raises(DomainError):
        await registry.put_manifest(repo, "v1", Manifest(SCHEMA2, json.dumps(doc).encode()))
    assert await registry.manifest_digest(repo, "v1") is None


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
async def test_wrong_credentials_are_a_final_error(
    scheme, registry_factory, http_session, htpasswd_auth, token_auth
):
    auth = {"basic": htpasswd_auth, "bearer": token_auth}[scheme]
    reg = await registry_factory("dc1", "http://127.0.0.1:9/", auth_yaml=auth)
    with pytest.raises(RegistryUnauthorized):
        await client(reg, http_session, USER, "wrong").manifest_digest("any/repo", "v1")


async def test_bearer_tokens_are_asked_per_scope_and_cached(
    registry_factory, http_session, token_service
):
    reg = await registry_factory("dc1", "http://127.0.0.1:9/", auth_yaml=token_service.auth_yaml())
    c = client(reg, http_session, USER, PASSWORD)
    repo = _repo()
    await _image(c, repo, "v1")
    asked = len(token_service.requests)

    await c.manifest_digest(repo, "v1")
    await c.manifest_digest(repo, "v1")

    assert len(token_service.requests) == asked + 1
    assert f"repository:{repo}:pull" in token_service.requests[-1]


# --- the BlobIndex port: the in-memory fake and the MongoDB index behave the same ----------


@pytest.fixture(params=["memory", "mongo"])
def blob_index(request, mongo_db) -> BlobIndex:
    """The BlobIndex port, as the fake or the real MongoDB-backed index."""
    if request.param == "memory":
        return MemoryBlobIndex()
    return MongoBlobIndex(mongo_db)


async def test_an_unknown_blob_is_held_nowhere(blob_index):
    assert await blob_index.where("dc1", digest_of(b"never seen")) == []


async def test_holders_are_remembered_once_each_and_per_dc(blob_index):
    digest = digest_of(b"layer")
    await blob_index.add("dc1", digest, "team/a")
    await blob_index.add("dc1", digest, "team/b")
    await blob_index.add("dc1", digest, "team/a")
    await blob_index.add("dc2", digest, "team/c")

    assert sorted(await blob_index.where("dc1", digest)) == ["team/a", "team/b"]
    assert await blob_index.where("dc2", digest) == ["team/c"]
    assert await blob_index.where("dc1", digest_of(b"other layer")) == []


async def test_concurrent_adds_of_a_new_blob_are_all_kept(blob_index):
    digest, repos = digest_of(secrets.token_bytes(16)), [f"team/r{i}" for i in range(8)]

    await asyncio.gather(*(blob_index.add("dc1", digest, repo) for repo in repos))

    assert sorted(await blob_index.where("dc1", digest)) == repos
