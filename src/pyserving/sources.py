"""Version discovery: which numeric version folders exist under a model's base path."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

log = logging.getLogger("pyserving")

_MAX_VERSION = 2**63 - 1


@dataclass(frozen=True)
class VersionPolicy:
    """TF Serving's ServableVersionPolicy: latest N (default 1), all, or specific versions."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = field(default_factory=tuple)


def parse_version(name: str) -> int | None:
    """`00000123` -> 123, like absl::SimpleAtoi on a folder name; None if not a version."""
    text = name.strip()
    if text.startswith("+"):
        text = text[1:]
    if not text.isascii() or not text.isdigit():
        return None
    version = int(text)
    return version if version <= _MAX_VERSION else None


def list_versions(model_name: str, base_path: str) -> dict[int, str] | None:
    """Numeric children of `base_path` as {version: path}; None (logged) if the base path is missing."""
    try:
        entries = os.listdir(base_path)
    except OSError as exc:
        log.error(
            "File-system polling update: Could not find base path %s for servable %s with error %s",
            base_path, model_name, exc.strerror or exc,
        )
        return None
    found: dict[int, str] = {}
    for entry in sorted(entries):
        version = parse_version(entry)
        if version is None:
            continue
        if version in found:
            log.warning("Duplicate version directories detected. Version %d will be loaded from %s",
                        version, found[version])
            continue
        found[version] = os.path.join(base_path, entry)
    if not found:
        log.warning(
            "No versions of servable %s found under base path %s. Did you forget to name your "
            "leaf directory as a number (eg. '/1/')?", model_name, base_path,
        )
    return found


def aspired_versions(found: dict[int, str], policy: VersionPolicy) -> list[int]:
    """The versions a policy wants loaded, highest first."""
    if policy.kind == "all":
        chosen = list(found)
    elif policy.kind == "specific":
        chosen = [v for v in policy.versions if v in found]
    else:
        chosen = sorted(found, reverse=True)[: max(policy.num_versions, 1)]
    return sorted(chosen, reverse=True)
