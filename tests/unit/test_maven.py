"""maven-metadata.xml is untrusted: entity bombs, external entities, malformed XML and unsafe
build names are refused with a clear error; Maven's own metadata resolves as before."""

from __future__ import annotations

import pytest

from libs.common.contracts.releases import Artifact
from libs.common.errors import NotFoundError
from libs.common.maven import InvalidMetadata, _snapshot_version

SNAPSHOT = Artifact(group_id="com.example", artifact_id="demo-app", version="2.1.0-SNAPSHOT")


def _metadata(value: str) -> str:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<metadata modelVersion="1.1.0">
  <groupId>com.example</groupId><artifactId>demo-app</artifactId><version>2.1.0-SNAPSHOT</version>
  <versioning>
    <snapshot><timestamp>20261129.054210</timestamp><buildNumber>1</buildNumber></snapshot>
    <snapshotVersions>
      <snapshotVersion><extension>pom</extension><value>2.1.0-20261129.054210-1</value>
      </snapshotVersion>
      <snapshotVersion><extension>tar.gz</extension><value>{value}</value></snapshotVersion>
    </snapshotVersions>
  </versioning>
</metadata>
"""


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE metadata [
  <!ENTITY lol "lol">
  <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
  <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
  <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
  <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
  <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
  <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<metadata><versioning><snapshot><timestamp>&lol9;</timestamp><buildNumber>1</buildNumber>
</snapshot></versioning></metadata>
"""

EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE metadata [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<metadata><versioning><snapshot><timestamp>&secret;</timestamp><buildNumber>1</buildNumber>
</snapshot></versioning></metadata>
"""

EXTERNAL_DTD = """<?xml version="1.0"?>
<!DOCTYPE metadata SYSTEM "http://127.0.0.1:1/evil.dtd">
<metadata/>
"""


def test_maven_metadata_resolves_the_build_of_the_packaging():
    assert _snapshot_version(_metadata("2.1.0-20261129.054210-1"), SNAPSHOT) == (
        "2.1.0-20261129.054210-1"
    )


@pytest.mark.parametrize(
    "document", [BILLION_LAUGHS, EXTERNAL_ENTITY, EXTERNAL_DTD], ids=["bomb", "entity", "dtd"]
)
def test_documents_with_a_dtd_are_refused_unparsed(document):
    with pytest.raises(InvalidMetadata, match=r"refused: DTDForbidden \(a DTD or entities") as e:
        _snapshot_version(document, SNAPSHOT)

    assert e.value.reason == "invalid_metadata"


def test_malformed_metadata_is_refused():
    with pytest.raises(
        InvalidMetadata, match="of com.example:demo-app:2.1.0-SNAPSHOT.* is not XML"
    ):
        _snapshot_version("<metadata><versioning>", SNAPSHOT)


@pytest.mark.parametrize("value", ["../../../etc/cron.d/x", ".hidden", "2.1.0;rm -rf /", "a/b"])
def test_a_build_that_is_not_one_safe_file_name_is_refused(value):
    with pytest.raises(InvalidMetadata, match="names an unsafe build"):
        _snapshot_version(_metadata(value), SNAPSHOT)


def test_metadata_without_a_build_is_not_found():
    with pytest.raises(NotFoundError, match="names no build"):
        _snapshot_version("<metadata><versioning/></metadata>", SNAPSHOT)
