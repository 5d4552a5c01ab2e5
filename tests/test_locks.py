"""The environments the tests run in are the ones the lock files pin (scripts/lock.sh writes them).

A mismatch means an install that did not go through scripts/setup.sh / scripts/test.sh, or a lock file changed since
the environment was made: the message says which packages differ and how to mend it.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests import e2e

ROOT = Path(__file__).resolve().parents[1]
PRODUCT_LOCK = ROOT / "locks" / "product.txt"
LABEL_STUDIO_LOCK = ROOT / "locks" / "label-studio.txt"
LABEL_STUDIO_VENV = ROOT / ".venv-labelstudio"
LIST_DISTRIBUTIONS = (
    "import json, importlib.metadata as m; "
    "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
)
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def pins(lock: Path) -> dict[str, str]:
    found = {}
    for line in lock.read_text().splitlines():
        match = PIN.match(line)
        if match:
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def differences(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    """'name: locked X, installed Y' for every pin the environment does not meet (a local build label such as
    torch's +cpu is not part of the pin)."""
    found = []
    for name, version in sorted(locked.items()):
        have = installed.get(name)
        if have is None:
            found.append(f"{name}: locked {version}, not installed")
        elif Version(have).public != Version(version).public:
            found.append(f"{name}: locked {version}, installed {have}")
    return found


def test_the_pin_reader_and_comparison_find_what_differs(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("# comment\nFoo_Bar==1.2.0\n    # via x\ntorch==2.13.0\nmissing==1.0\n")
    locked = pins(lock)
    assert locked == {"foo-bar": "1.2.0", "torch": "2.13.0", "missing": "1.0"}
    installed = {"foo-bar": "1.3.0", "torch": "2.13.0+cpu"}
    assert differences(locked, installed) == [
        "foo-bar: locked 1.2.0, installed 1.3.0",
        "missing: locked 1.0, not installed",
    ]


def test_this_environment_has_the_locked_versions():
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    found = differences(pins(PRODUCT_LOCK), installed)
    assert not found, (
        f"this environment differs from {PRODUCT_LOCK.relative_to(ROOT)} in {len(found)} packages (run "
        "`bash scripts/setup.sh test` to install the locked versions, or `bash scripts/lock.sh` after changing "
        "pyproject.toml):\n  " + "\n  ".join(found)
    )


def test_the_lock_meets_every_range_in_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = pins(PRODUCT_LOCK)
    requirements = [Requirement(text) for text in [*project["dependencies"], *project["optional-dependencies"]["test"]]]
    outside = [
        f"{req}: locked {locked.get(canonicalize_name(req.name), 'nothing')}"
        for req in requirements
        if canonicalize_name(req.name) not in locked or not req.specifier.contains(locked[canonicalize_name(req.name)])
    ]
    assert not outside, "pyproject.toml and locks/product.txt disagree (run bash scripts/lock.sh):\n  " + "\n  ".join(
        outside
    )


def test_the_label_studio_of_the_e2e_tests_has_the_locked_versions():
    if not e2e.LABEL_STUDIO:
        pytest.skip("set XDECODER_E2E_LABEL_STUDIO (scripts/test.sh installs Label Studio and sets it)")
    executable = Path(e2e.LABEL_STUDIO)
    if executable.parent.parent.resolve() != LABEL_STUDIO_VENV.resolve():
        pytest.skip(f"{executable} is a Label Studio of your own, not the locked one scripts/test.sh installs")
    listing = subprocess.run(
        [str(executable.parent / "python"), "-c", LIST_DISTRIBUTIONS], capture_output=True, text=True, check=True
    )
    installed = {canonicalize_name(name): version for name, version in json.loads(listing.stdout).items()}
    found = differences(pins(LABEL_STUDIO_LOCK), installed)
    assert not found, (
        f"{LABEL_STUDIO_VENV.name} differs from {LABEL_STUDIO_LOCK.relative_to(ROOT)} (run bash scripts/test.sh, "
        "which installs the locked versions):\n  " + "\n  ".join(found)
    )
