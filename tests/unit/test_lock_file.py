"""requirements.lock, the hashed pins the Docker image installs, stays in step with pyproject.toml."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
# The command that writes the lock: the README's "Supply chain" gives it in full.
REGENERATE = "pip-compile --generate-hashes ... pyproject.toml, as the README's Supply chain says"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def locked() -> dict[str, tuple[Version, list[str]]]:
    """Each pinned package: its version and its hashes."""
    pins: dict[str, tuple[Version, list[str]]] = {}
    current: list[str] = []
    for line in LOCK.read_text().splitlines():
        found = _PIN.match(line)
        if found:
            current = []
            pins[canonicalize_name(found.group(1))] = (Version(found.group(2)), current)
        elif line.strip().startswith("--hash="):
            current.append(line.strip().removeprefix("--hash=").rstrip(" \\"))
    return pins


def runtime_requirements() -> list[Requirement]:
    """The project's dependencies and every extra but `dev` (a future `[postgres]` included)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"])
    for extra, more in project.get("optional-dependencies", {}).items():
        if extra != "dev":
            texts += more
    return [Requirement(text) for text in texts]


def test_every_runtime_dependency_is_pinned_within_pyprojects_bounds():
    pins = locked()
    for requirement in runtime_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in requirements.lock: regenerate it ({REGENERATE})"
        version, _ = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {name}=={version}, outside pyproject's {requirement}: regenerate it ({REGENERATE})"
        )


def test_every_pin_is_exact_and_hashed():
    pins = locked()
    assert len(pins) >= len(runtime_requirements())
    for name, (_, hashes) in pins.items():
        assert hashes, f"{name} has no --hash in requirements.lock"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name
    text = LOCK.read_text()
    assert "--find-links" not in text and "--index-url" not in text  # nothing of this machine's pip set-up
    assert re.search(r"^#\s+pip-compile .*--generate-hashes.* pyproject\.toml$", text, re.M)  # what wrote it


def test_the_lock_holds_what_the_pinned_packages_need():
    """Where the installed version is the pinned one, its own requirements are pinned too: pip's hash-checking
    mode would refuse to build the image otherwise."""
    pins = locked()
    checked = 0
    for name, (version, _) in pins.items():
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if Version(distribution.version) != version:
            continue
        checked += 1
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            assert canonicalize_name(requirement.name) in pins, f"{name} needs {requirement}, not in the lock"
    assert checked, "none of the pinned versions is installed here: cannot check what they need"


def test_the_image_installs_exactly_the_lock():
    dockerfile = (ROOT / "Dockerfile").read_text()
    install = re.search(r"pip install (--require-hashes -r requirements\.lock)\b", dockerfile)
    assert install is not None, "the Dockerfile installs the dependencies from requirements.lock, hashes required"
    assert dockerfile.index("COPY requirements.lock") < install.start() < dockerfile.index("COPY bot ")
    assert "pip install ." not in dockerfile  # nothing resolved afresh at build time
    assert "requirements.lock" not in (ROOT / ".dockerignore").read_text().split()
