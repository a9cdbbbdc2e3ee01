"""Which images the hosts of a dc pull ahead of a create: the prewarm policy (pure).

``all``: every tag that arrives in the dc's registry; ``in-use``: the tags that an app's
machines use; otherwise a comma list of ``repo`` (any of its tags) or ``repo:tag``. A reference
is compared without its registry, as the same ``repo:tag`` lives in each dc's registry under
another ``host:port``. The policy keeps the hosts' disks from filling with every tag pushed.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["POLICY_RE", "catch_up", "split_ref", "wanted"]

_ITEM = r"[a-z0-9][a-z0-9._/-]*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
# What DOCKVM_PREWARM_POLICY accepts.
POLICY_RE = rf"^(all|in-use|{_ITEM}(,{_ITEM})*)$"


def split_ref(ref: str) -> tuple[str, str]:
    """``(repo, tag)`` of an image reference, without its registry or digest."""
    name = ref.split("@", 1)[0]
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        name = rest
    repo, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:
        return name, "latest"
    return repo, tag


def wanted(policy: str, ref: str, in_use: Iterable[str]) -> bool:
    """Whether ``ref`` is prewarmed under ``policy``; ``in_use``: the images machines use."""
    repo, tag = split_ref(ref)
    if policy == "all":
        return True
    if policy == "in-use":
        return (repo, tag) in {split_ref(r) for r in in_use}
    for item in policy.split(","):
        want_repo, _, want_tag = item.strip().partition(":")
        if want_repo == repo and want_tag in ("", tag):
            return True
    return False


def catch_up(
    policy: str, candidates: Iterable[str], in_use: Iterable[str], present: Iterable[str]
) -> list[str]:
    """What a host that comes back (or is new) pulls: the ``candidates`` (what its dc's other
    hosts hold, and what its machines use) that the policy wants and it does not hold."""
    used = list(in_use)
    have = {split_ref(r) for r in present}
    out: dict[tuple[str, str], str] = {}
    for ref in [*used, *candidates]:
        key = split_ref(ref)
        if key not in have and key not in out and _pullable(ref) and wanted(policy, ref, used):
            out[key] = ref
    return sorted(out.values())


def _pullable(ref: str) -> bool:
    """A reference naming a registry (a local-only tag would be looked up on Docker Hub), not a
    dangling ``<none>`` tag."""
    first, _, rest = ref.partition("/")
    has_registry = bool(rest) and ("." in first or ":" in first or first == "localhost")
    return has_registry and "<none>" not in ref
