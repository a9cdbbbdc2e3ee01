"""The builder's pure logic: the policy check of a spec, the rendered Dockerfile and context, and
the verification of an image's packages, sockets, layers and size."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from pydantic import ValidationError

from libs.common.contracts.builder import (
    DEFAULT_POLICY,
    BuildSpec,
    ImagePolicy,
    policy_violations,
    port_allowed,
    spec_digest,
)
from services.builder import domain

pytestmark = pytest.mark.unit
BASE = DEFAULT_POLICY.bases[0]


def _spec(**fields) -> BuildSpec:
    return BuildSpec(name="team/web", tag="1", base="debian-bookworm", **fields)


def test_the_default_policy_passes_a_curated_spec():
    spec = _spec(packages=["openjdk-17-jre-headless", "tomcat10", "nginx", "python3", "curl"],
                 ports=[8080, 443], files={"/opt/app/conf.ini": "x"})  # fmt: skip

    assert policy_violations(spec, DEFAULT_POLICY) == []


@pytest.mark.parametrize(
    ("fields", "field", "kind"),
    [
        ({"base": "alpine:3"}, "base", "unknown_base"),
        ({"packages": ["curl", "gcc-12"]}, "packages.1", "denied_package"),
        ({"packages": ["cowsay"]}, "packages.0", "unlisted_package"),
        ({"ports": [80, 3306]}, "ports.1", "denied_port"),
        ({"ports": [2376]}, "ports.0", "denied_port"),
        ({"files": {"/root/.ssh/authorized_keys": "k"}}, "files./root/.ssh/authorized_keys",
         "forbidden_path"),
        ({"files": {"relative/x": "k"}}, "files.relative/x", "forbidden_path"),
        ({"files": {"/opt/../etc/shadow": "k"}}, "files./opt/../etc/shadow", "forbidden_path"),
        ({"run": ["id"]}, "run", "run_not_allowed"),
        ({"labels": {"dockvm.build.id": "x"}}, "labels.dockvm.build.id", "reserved_label"),
    ],
)  # fmt: skip
def test_each_refused_item_is_named_on_its_field(fields, field, kind):
    spec = _spec(**fields) if "base" not in fields else BuildSpec(
        name="team/web", tag="1", **fields)  # fmt: skip

    assert [(v.field, v.type) for v in policy_violations(spec, DEFAULT_POLICY)] == [(field, kind)]


def test_deny_wins_over_allow_and_ranges_bound_ports():
    policy = ImagePolicy.model_validate({
        **DEFAULT_POLICY.model_dump(), "packages": {"allow": ["lib*"], "deny": ["libssl*"]},
        "ports": {"allow": ["1024-65535"], "deny": [8081]}, "max_size": "1g",
    })  # fmt: skip

    assert [v.field for v in policy_violations(_spec(packages=["libfoo", "libssl3"]), policy)] == [
        "packages.1"
    ]
    assert [port_allowed(p, policy.ports) for p in (80, 1024, 8081, 65535)] == [
        False, True, False, True]  # fmt: skip
    assert policy.max_size == 1 << 30


def test_a_policy_with_a_bad_port_range_is_refused():
    with pytest.raises(ValidationError, match="ports are 1-65535"):
        ImagePolicy.model_validate({**DEFAULT_POLICY.model_dump(), "ports": {"deny": ["9-3"]}})


def test_the_spec_digest_depends_on_content_not_order():
    a = _spec(env={"A": "1", "B": "2"}, packages=["curl"])
    b = _spec(packages=["curl"], env={"B": "2", "A": "1"})

    assert spec_digest(a) == spec_digest(b) != spec_digest(_spec(packages=["jq"]))


def test_the_dockerfile_quotes_what_the_spec_holds():
    spec = _spec(packages=["jq", "curl"], env={"MSG": 'a "b" $HOME \\x'}, ports=[8080],
                 files={"/opt/x": "y"}, run=["echo hi > /tmp/x"])  # fmt: skip

    text = domain.render_dockerfile(spec, BASE, "b-123456")
    lines = text.splitlines()

    assert lines[1] == "FROM dockvm/base:bookworm"
    apt = json.loads(lines[2].removeprefix("RUN "))
    assert apt[:2] == ["/bin/sh", "-ec"]
    assert "apt-get install -y --no-install-recommends -- curl jq" in apt[2]
    assert lines[3] == "COPY rootfs/ /"
    assert lines[4] == 'ENV MSG="a \\"b\\" \\$HOME \\\\x"'
    assert json.loads(lines[5].removeprefix("RUN "))[2] == "echo hi > /tmp/x"
    assert lines[6] == "EXPOSE 8080/tcp"


def test_the_context_holds_the_files_with_script_modes():
    spec = _spec(files={"/app/current/bin/start": "#!/bin/sh\nexec x\n", "/opt/a.txt": "a"})

    with tarfile.open(fileobj=io.BytesIO(domain.render_context(spec, BASE, "b-1234567"))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        start = tar.extractfile("rootfs/app/current/bin/start").read()

    assert set(members) >= {"Dockerfile", "rootfs/app", "rootfs/app/current/bin/start",
                            "rootfs/opt/a.txt"}  # fmt: skip
    assert members["rootfs/app/current/bin/start"].mode == 0o755
    assert members["rootfs/opt/a.txt"].mode == 0o644
    assert start == b"#!/bin/sh\nexec x\n"


DPKG = "\n".join([
    "base-files\t12\t\t\t\tii ",
    "libc6\t2.36\t\tlibgcc-s1\t\tii ",
    "libgcc-s1\t12\t\tlibc6 (>= 2.35)\t\tii ",
    "jq\t1.6\t\tlibjq1 (= 1.6), libc6 (>= 2.34)\t\tii ",
    "libjq1\t1.6\t\tlibonig5 (>= 6.1) | libonig4, libc6\t\tii ",
    "libonig5\t6.9\t\tlibc6\t\tii ",
    "mawk\t1.3\t\tlibc6\tawk\tii ",
    "app\t1\t\tawk\t\tii ",
    "stray\t1\t\t\t\tii ",
    "removed\t1\t\t\t\trc ",
])  # fmt: skip


def test_dpkg_output_becomes_packages_with_dependencies():
    pkgs = domain.parse_dpkg(DPKG)

    assert "removed" not in pkgs
    assert pkgs["libjq1"].depends == (("libonig5", "libonig4"), ("libc6",))
    assert pkgs["mawk"].provides == ("awk",)


def test_an_image_is_checked_for_unexpected_and_denied_packages():
    image = domain.parse_dpkg(DPKG)
    base = {k: v for k, v in image.items() if k in ("base-files", "libc6", "libgcc-s1")}
    policy = ImagePolicy.model_validate({
        **DEFAULT_POLICY.model_dump(),
        "packages": {"allow": ["jq", "app"], "deny": ["libonig5"]},
    })  # fmt: skip

    found = domain.sbom_violations(image, base, ["jq", "app", "absent"], policy)

    assert [(v.type, v.message.split(" ")[0]) for v in found] == [
        ("denied_dependency", "libonig5"),
        ("unexpected_package", "stray"),
        ("missing_package", "absent"),
    ]
    # A virtual package (awk) counts through what provides it (mawk).
    assert domain.dependency_closure(["app"], image)["mawk"] == "app"


SS = """\
tcp   LISTEN 0      128          0.0.0.0:22        0.0.0.0:*    users:(("sshd",pid=7,fd=3))
tcp   LISTEN 0      128             [::]:22           [::]:*    users:(("sshd",pid=7,fd=4))
tcp   LISTEN 0      5            0.0.0.0:3306      0.0.0.0:*    users:(("python3",pid=9,fd=3))
udp   UNCONN 0      0            0.0.0.0:8125      0.0.0.0:*    users:(("statsd",pid=11,fd=5))
"""


def test_a_denied_port_listening_fails_with_its_process_and_the_bases_own_sshd_does_not():
    listeners = domain.parse_listeners(SS)

    found = domain.listening_violations(listeners, BASE, DEFAULT_POLICY)

    assert sorted(str(s) for s in listeners) == [
        "tcp/22 (sshd pid 7)", "tcp/3306 (python3 pid 9)", "udp/8125 (statsd pid 11)"]  # fmt: skip
    assert [v.message for v in found] == ["port 3306/tcp is listening, opened by python3 pid 9"]


def test_layers_and_size_are_bounded():
    found = domain.shape_violations(9, 3 << 30, DEFAULT_POLICY)

    assert [v.type for v in found] == ["too_many_layers", "too_large"]
    assert domain.shape_violations(3, 1 << 20, DEFAULT_POLICY) == []


@pytest.mark.parametrize(
    ("ref", "parts"),
    [
        ("127.0.0.1:5001/team/web:1", ("team/web", "1", None)),
        ("dockvm/base:bookworm", ("dockvm/base", "bookworm", None)),
        ("registry.example/team/web", ("team/web", "latest", None)),
        ("localhost/web@sha256:ab", ("web", None, "sha256:ab")),
        ("web", ("web", "latest", None)),
    ],
)
def test_an_image_reference_is_split_into_repository_tag_and_digest(ref, parts):
    from services.gateway.built_images import split_ref

    assert split_ref(ref) == parts
