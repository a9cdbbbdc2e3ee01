"""imagesync's pure decisions: which notifications act, what manifests reference, what the
catalog reconcile copies, and the topology setting."""

from __future__ import annotations

import json

import pytest

from libs.common.contracts.imagesync import ImageSync
from libs.common.errors import ValidationFailed
from services.imagesync.domain import (
    USER_AGENT,
    Ignored,
    Manifest,
    PushedManifest,
    SyncOrder,
    UnsupportedManifest,
    add_to_history,
    classify_event,
    digest_of,
    job_id,
    parse_envelope,
    plan_reconcile,
)
from services.imagesync.settings import parse_registries

D = {c: "sha256:" + c * 64 for c in "abcdef0123"}
SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _event(**over):
    ev = {
        "id": "ev-1",
        "action": "push",
        "target": {
            "mediaType": SCHEMA2,
            "size": 528,
            "digest": D["a"],
            "repository": "team/app",
            "tag": "v1",
        },
        "request": {"host": "127.0.0.1:5001", "useragent": "docker/27.0 go/go1.22"},
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            ev[section] = {**ev[section], field: value}
        else:
            ev[section] = value
    return ev


def test_tagged_manifest_push_is_acted_on():
    expected = PushedManifest("ev-1", "team/app", "v1", D["a"], SCHEMA2, 528)
    assert classify_event(_event()) == expected


def test_the_pushed_images_blobs_are_taken_from_its_references():
    refs = [
        {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": D["b"]},
        {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": D["c"]},
        {"mediaType": SCHEMA2, "digest": D["d"]},  # a child manifest is not a blob
    ]
    decision = classify_event(_event(target__references=refs))
    assert decision.blobs == (D["b"], D["c"])


@pytest.mark.parametrize(
    ("override", "why"),
    [
        ({"action": "pull"}, "action pull"),
        ({"action": "mount"}, "action mount"),
        ({"target__mediaType": "application/octet-stream"}, "not a manifest"),
        ({"target__tag": None}, "no tag"),
        ({"request__useragent": f"{USER_AGENT} aiohttp"}, "our own replication push"),
        (
            {"target__mediaType": "application/vnd.docker.distribution.manifest.v1+prettyjws"},
            "not a manifest",
        ),
    ],
)
def test_other_notifications_are_ignored_with_a_reason(override, why):
    decision = classify_event(_event(**override))
    assert isinstance(decision, Ignored)
    assert why in decision.why


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", '"events" list'),
        (b'{"events": {}}', '"events" list'),
        (b'{"events": [{"action": "push"}]}', "events[0] has no string id"),
        (b'{"events": [{"id": "x", "target": 3}]}', "events[0].target"),
    ],
)
def test_malformed_notification_bodies_are_refused(body, message):
    with pytest.raises(ValidationFailed, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_envelope(body)


def test_envelope_events_are_returned_in_order():
    body = json.dumps({"events": [_event(id="a"), _event(id="b")]}).encode()
    assert [e["id"] for e in parse_envelope(body)] == ["a", "b"]


def _image(layers, config=D["c"], media_type=SCHEMA2, extra_layers=()):
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": config,
            "size": 10,
        },
        "layers": [
            {
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "digest": d,
                "size": 5,
            }
            for d in layers
        ]
        + list(extra_layers),
    }
    return Manifest(media_type, json.dumps(doc).encode())


def test_image_manifest_lists_config_then_layers_once_without_foreign_layers():
    foreign = {
        "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "digest": D["f"],
        "size": 9,
        "urls": ["https://example.invalid/l"],
    }
    m = _image([D["a"], D["b"], D["a"]], extra_layers=[foreign])
    assert [d.digest for d in m.blobs()] == [D["c"], D["a"], D["b"]]
    assert m.children() == []
    assert m.digest == digest_of(m.raw)


def test_index_lists_its_children_and_no_blobs():
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": SCHEMA2,
                "digest": D["a"],
                "size": 1,
                "platform": {"architecture": "amd64"},
            },
            {
                "mediaType": SCHEMA2,
                "digest": D["b"],
                "size": 1,
                "platform": {"architecture": "arm64"},
            },
        ],
    }
    m = Manifest(OCI_INDEX, json.dumps(doc).encode())
    assert m.is_index
    assert [c.digest for c in m.children()] == [D["a"], D["b"]]
    assert m.blobs() == []


@pytest.mark.parametrize(
    ("manifest", "error"),
    [
        (
            Manifest("application/vnd.docker.distribution.manifest.v1+prettyjws", b"{}"),
            UnsupportedManifest,
        ),
        (Manifest(SCHEMA2, b"not json"), ValidationFailed),
        (Manifest(SCHEMA2, b'{"config": {"digest": "md5:abc"}}'), ValidationFailed),
    ],
)
def test_manifests_we_cannot_copy_are_refused(manifest, error):
    with pytest.raises(error):
        manifest.blobs()


def test_job_id_is_the_natural_key():
    a = job_id("dc1", "dc2", "r", "t", D["a"])
    assert a == job_id("dc1", "dc2", "r", "t", D["a"])
    assert a != job_id("dc1", "dc2", "r", "t", D["b"])
    assert a != job_id("dc2", "dc1", "r", "t", D["a"])


K = ("team/app", "v1")


@pytest.mark.parametrize(
    ("listing", "history", "orders", "conflicts"),
    [
        # in sync: nothing to do
        ({"dc1": {K: D["a"]}, "dc2": {K: D["a"]}}, {}, [], 0),
        # pushed to dc1 while we were down: copy to dc2
        ({"dc1": {K: D["a"]}, "dc2": {}}, {}, [SyncOrder("dc1", "dc2", *K, D["a"])], 0),
        # pushed to dc2 only: copy the other way
        ({"dc1": {}, "dc2": {K: D["b"]}}, {}, [SyncOrder("dc2", "dc1", *K, D["b"])], 0),
        # re-pushed in dc1 while we were down: the digest never seen is the newest
        (
            {"dc1": {K: D["b"]}, "dc2": {K: D["a"]}},
            {K: [D["a"]]},
            [SyncOrder("dc1", "dc2", *K, D["b"])],
            0,
        ),
        # the push was seen but its copy failed (dc2 was down): the latest seen wins
        (
            {"dc1": {K: D["b"]}, "dc2": {K: D["a"]}, "dc3": {}},
            {K: [D["a"], D["b"]]},
            [SyncOrder("dc1", "dc2", *K, D["b"]), SyncOrder("dc1", "dc3", *K, D["b"])],
            0,
        ),
        (
            {"dc1": {K: D["a"]}, "dc2": {K: D["b"]}},
            {K: [D["b"], D["a"]]},
            [SyncOrder("dc1", "dc2", *K, D["a"])],
            0,
        ),
        # two digests nobody saw pushed: which is newer is unknown, leave it alone
        ({"dc1": {K: D["a"]}, "dc2": {K: D["b"]}}, {}, [], 1),
        ({"dc1": {K: D["a"]}, "dc2": {K: D["b"]}, "dc3": {K: D["c"]}}, {K: [D["c"]]}, [], 1),
    ],
)
def test_reconcile_plan(listing, history, orders, conflicts):
    plan = plan_reconcile(listing, history, order=list(listing))
    assert plan.orders == orders
    assert len(plan.conflicts) == conflicts


def test_history_keeps_the_latest_digest_last_and_is_capped():
    assert add_to_history([D["a"], D["b"]], D["a"]) == [D["b"], D["a"]]
    assert add_to_history([D["a"], D["b"], D["c"]], D["d"], keep=2) == [D["c"], D["d"]]


def test_registries_setting_parses_dcs_urls_and_credentials():
    regs = parse_registries("dc1=http://127.0.0.1:5001/, dc2=https://u%40x:p%3Aw@reg.example:443")
    assert [(r.dc, r.url, r.host) for r in regs] == [
        ("dc1", "http://127.0.0.1:5001", "127.0.0.1:5001"),
        ("dc2", "https://reg.example:443", "reg.example:443"),
    ]
    assert (regs[1].username, regs[1].password) == ("u@x", "p:w")


@pytest.mark.parametrize(
    "raw", ["dc1", "dc1=ftp://x", "dc1=http://a:1,dc1=http://b:2", "=http://a:1"]
)
def test_bad_registries_setting_is_refused(raw):
    with pytest.raises(ValueError):
        parse_registries(raw)


@pytest.mark.parametrize(
    "data",
    [
        {"source": "dc1", "target": "dc2", "repo": "Team/App", "tag": "v1"},
        {"source": "dc1", "target": "dc2", "repo": "team/app", "tag": "-v1"},
        {"source": "dc1", "target": "dc2", "repo": "team/app", "tag": "v1", "digest": "sha256:x"},
        {"source": "dc1", "target": "dc2", "repo": "team/app", "tag": "v1", "extra": 1},
    ],
)
def test_sync_command_refuses_bad_references(data):
    with pytest.raises(ValueError):
        ImageSync.model_validate(data)
