"""imagesync's dedupe key of a push: the two replicas of a dc behind a balancer may report one
push under two event ids; the key is the push itself."""

from __future__ import annotations

import pytest

from services.imagesync.domain import PushedManifest, push_key

SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
DIGEST = "sha256:" + "a" * 64


def _pushed(event_id: str = "ev-1", **over: str) -> PushedManifest:
    fields = {"repo": "team/web", "tag": "v1", "digest": DIGEST, **over}
    return PushedManifest(event_id, fields["repo"], fields["tag"], fields["digest"], SCHEMA2, 500)


def test_two_event_ids_of_one_push_share_the_key():
    assert push_key("dc1", _pushed("from-r1")) == push_key("dc1", _pushed("from-r2"))


@pytest.mark.parametrize(
    ("dc", "over"),
    [
        ("dc2", {}),
        ("dc1", {"repo": "team/api"}),
        ("dc1", {"tag": "v2"}),
        ("dc1", {"digest": "sha256:" + "b" * 64}),
        # No field boundary to slide across: "team/w" + "eb" is not "team/web" + "".
        ("dc1", {"repo": "team/webv", "tag": "1"}),
    ],
)
def test_another_dc_repo_tag_or_digest_is_another_push(dc, over):
    assert push_key(dc, _pushed(**over)) != push_key("dc1", _pushed())
