"""Which Python packages to install in Slicer, and installing them without touching PyTorch.

Rules (from what users of Slicer AI extensions report most: a working GPU PyTorch replaced by
a CPU one):

* torch is never pip-installed here. A missing torch is installed by the PyTorch extension
  (``PyTorchUtils``), which picks the build for the computer's GPU driver; a torch older than
  :data:`MINIMUM_TORCH_VERSION` is reported with advice, not replaced.
* The other requirements are checked by version, not only by presence, and installed with a
  constraints file that pins the installed torch (``torch==<installed version>``), so pip
  cannot swap it while resolving MONAI's dependencies.
* Slicer 5.10+ has ``slicer.packaging.pip_ensure``; it is a submodule, imported explicitly
  (``import slicer.packaging``) before deciding it is missing.

:func:`plan` decides (pure Python, tested without Slicer); :func:`ensure` carries it out with
the installer functions it is given (Slicer's in the module).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

MINIMUM_TORCH_VERSION = "2.2"
TORCH = "torch"


class DependencyError(RuntimeError):
    """A dependency cannot be set up; the message says what the user can do."""


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of a distribution (without importing it), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def read_requirements(path: str) -> list[str]:
    """Requirement lines of a requirements file (comments, blank lines and pip options dropped)."""
    with open(path, encoding="utf-8") as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return [line for line in lines if line and not line.startswith("-")]


def _satisfied(requirement: Requirement, version: Optional[str]) -> bool:
    if version is None:
        return False
    if requirement.marker is not None and not requirement.marker.evaluate():
        return True
    return requirement.specifier.contains(version, prereleases=True)


def _older(version: str, minimum: str) -> bool:
    try:
        return Version(version).release < Version(minimum).release
    except InvalidVersion:
        return False


@dataclass
class Plan:
    """What :func:`ensure` will do.

    Attributes:
        torch_version: the installed torch, or None.
        torch_action: "ok", "install" (ask the PyTorch extension) or "too_old".
        install: requirement strings to pip-install (never torch).
        constraints: lines of the constraints file passed to pip (the installed torch pinned).
    """

    torch_version: Optional[str]
    torch_action: str
    install: list[str] = field(default_factory=list)
    constraints: list[str] = field(default_factory=list)

    @property
    def nothing_to_do(self) -> bool:
        return self.torch_action == "ok" and not self.install


def plan(requirements: list[str], installed: Callable[[str], Optional[str]] = installed_version,
         minimum_torch: str = MINIMUM_TORCH_VERSION) -> Plan:
    """Decide what to install; ``installed`` maps a distribution name to its version or None."""
    torch_version = installed(TORCH)
    if torch_version is None:
        action = "install"
    elif _older(torch_version, minimum_torch):
        action = "too_old"
    else:
        action = "ok"
    install = []
    for line in requirements:
        requirement = Requirement(line)
        if requirement.name.lower() == TORCH:
            continue  # the PyTorch extension's job
        if not _satisfied(requirement, installed(requirement.name)):
            install.append(str(requirement))
    constraints = [f"{TORCH}=={torch_version}"] if torch_version else []
    return Plan(torch_version, action, install, constraints)


def slicer_packaging() -> Any:
    """``slicer.packaging`` (Slicer 5.10+) or None. A submodule is not an attribute of its
    package until imported, so it is imported here rather than looked up."""
    try:
        return importlib.import_module("slicer.packaging")
    except ImportError:
        return None


def _pytorch_utils() -> Any:
    try:
        return importlib.import_module("PyTorchUtils")
    except ImportError:
        return None


def install_torch(ask: bool, minimum_torch: str = MINIMUM_TORCH_VERSION,
                  pytorch_utils: Optional[Callable[[], Any]] = None) -> None:
    """Install torch through the PyTorch extension (never with pip from here)."""
    module = (pytorch_utils or _pytorch_utils)()
    if module is None:
        raise DependencyError("MedDiffFM needs PyTorch. Install the 'PyTorch' extension from the Extensions "
                              "Manager, restart Slicer, and press Apply again.")
    torch = module.PyTorchUtilsLogic().installTorch(askConfirmation=ask,
                                                    torchVersionRequirement=f">={minimum_torch}")
    if torch is None:
        raise DependencyError("PyTorch was not installed. Install it with the PyTorch Utils module "
                              f"(version >= {minimum_torch}) and press Apply again.")


def ensure(requirements: list[str], *, ask: bool = True, pip_install: Optional[Callable[[list[str]], None]] = None,
           confirm: Optional[Callable[[str], bool]] = None, installed: Callable[[str], Optional[str]] = installed_version,
           pytorch_utils: Optional[Callable[[], Any]] = None, packaging_module: Any = "import",
           minimum_torch: str = MINIMUM_TORCH_VERSION) -> Plan:
    """Make the requirements importable without replacing the installed torch; the final plan.

    Args:
        requirements: requirement strings (``read_requirements`` of the module's file).
        ask: ask the user before installing.
        pip_install: ``slicer.util.pip_install`` (takes a list of pip arguments); used when
            ``slicer.packaging`` is missing.
        confirm: asks a yes/no question (``slicer.util.confirmOkCancelDisplay``).
        installed, pytorch_utils, packaging_module: seams for tests ("import": find it).

    Raises:
        DependencyError: what is wrong and what the user can do.
    """
    current = plan(requirements, installed, minimum_torch)
    if current.torch_action == "too_old":
        raise DependencyError(
            f"PyTorch {current.torch_version} is installed, MedDiffFM needs {minimum_torch} or later. Use the "
            f"PyTorch Utils module to install PyTorch with the version requirement '>={minimum_torch}' "
            "(it picks the build for your GPU), restart Slicer and press Apply again.")
    if current.torch_action == "install":
        install_torch(ask, minimum_torch, pytorch_utils)
        current = plan(requirements, installed, minimum_torch)
        if current.torch_action != "ok":
            raise DependencyError(f"PyTorch >= {minimum_torch} is still not available after its installation; "
                                  "restart Slicer and press Apply again.")
    if not current.install:
        return current
    if ask and confirm is not None and not confirm(
            "MedDiffFM needs these Python packages, which will be installed now (a few minutes, once): "
            + ", ".join(current.install) + ". PyTorch stays as it is."):
        raise DependencyError("The installation of MedDiffFM's Python packages was cancelled.")
    packaging = slicer_packaging() if packaging_module == "import" else packaging_module
    with tempfile.TemporaryDirectory(prefix="meddifffm-pip-") as tmp:
        constraints = os.path.join(tmp, "constraints.txt")
        with open(constraints, "w", encoding="utf-8") as f:
            f.write("\n".join(current.constraints) + "\n")
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(current.install, constraints=constraints, requester="MedDiffFM",
                                 prompt_install=False)
        elif pip_install is not None:
            pip_install([*current.install, "-c", constraints])
        else:
            raise DependencyError("no way to install Python packages here: run "
                                  f"'pip install {' '.join(current.install)}' in Slicer's Python")
    final = plan(requirements, installed, minimum_torch)
    if final.install:
        raise DependencyError("these packages are still missing or too old after the installation: "
                              + ", ".join(final.install) + ". Restart Slicer and press Apply again.")
    if final.torch_version != current.torch_version:
        raise DependencyError(f"the installation changed PyTorch from {current.torch_version} to "
                              f"{final.torch_version}; reinstall it with the PyTorch Utils module")
    return final
