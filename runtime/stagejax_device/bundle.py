"""A device bundle (design §9): what `stagejax.export` writes and the runtime refuses or opens.

    bundle/
      module.vmfb      IREE module: one function per distinct group program (+ sampler, keys,
                       KV quantizer), compiled for one target
      plan.json        format version, target, checkpoint (path + manifest sha256), model config,
                       KV layout, functions' flattened signatures, groups in execution order
      tokenizer.npz    the compact tokenizer (`stagejax_device.tokenizer`)
      weights/         the stage shards, when the bundle is self-contained

`Bundle.open` checks, before anything runs, that the plan is a bundle of a version this
runtime reads, that its module exists and is the one the plan was written with (sha256), that
it was compiled for this machine (architecture and CPU features), and that the checkpoint is
the one it was planned for (the sha256 of its manifest); each refusal names both sides and
what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from pathlib import Path

from stagejax_device.manifest import MANIFEST_FILE

BUNDLE_FORMAT = {"name": "stagejax-bundle", "version": 1}
PLAN_FILE = "plan.json"
MODULE_FILE = "module.vmfb"
MODULE_NAME = "stagejax"  # the IREE module's name: its functions are ctx.modules.stagejax[...]
TOKENIZER_FILE = "tokenizer.npz"
WEIGHTS_DIR = "weights"

# Export targets: the architecture the code runs on and IREE's llvm-cpu flags for it.
TARGETS = {
    "host": {"arch": platform.machine(), "flags": ("--iree-llvmcpu-target-cpu=host",)},
    # A Raspberry Pi 5's Cortex-A76 (ARMv8.2-A with dot products).
    "aarch64": {"arch": "aarch64", "flags": ("--iree-llvmcpu-target-triple=aarch64-unknown-linux-gnu",
                                             "--iree-llvmcpu-target-cpu=cortex-a76")},
}


class BundleError(ValueError):
    """A bundle this runtime cannot run; the message names the file or field and what to do."""


def manifest_sha256(checkpoint: str | Path) -> str:
    """The identity of a checkpoint: the sha256 of its manifest (which holds every array's
    shape, dtype and block checksums, and the conversion parameters)."""
    path = Path(checkpoint) / MANIFEST_FILE
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise BundleError(f"{path} does not exist: no stage-shard checkpoint at {checkpoint}") from None


def machine_arch() -> str:
    return platform.machine()


def machine_cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@dataclasses.dataclass
class Bundle:
    path: Path
    plan: dict
    checkpoint: Path

    @property
    def module_file(self) -> Path:
        return self.path / self.plan["module"]["file"]

    @property
    def tokenizer_file(self) -> Path:
        return self.path / TOKENIZER_FILE

    @classmethod
    def open(cls, path: str | Path, checkpoint: str | Path | None = None) -> "Bundle":
        """Read and check a bundle. `checkpoint` overrides where its stage shards are."""
        path = Path(path)
        plan_file = path / PLAN_FILE
        if not plan_file.is_file():
            raise BundleError(f"{path} is not a bundle: {PLAN_FILE} is missing (make one with "
                              "python -m stagejax.export)")
        try:
            plan = json.loads(plan_file.read_text())
        except (OSError, ValueError) as error:
            raise BundleError(f"{plan_file} is unreadable ({error}); export the bundle again") from error
        if (plan.get("format"), plan.get("version")) != (BUNDLE_FORMAT["name"], BUNDLE_FORMAT["version"]):
            raise BundleError(f"{plan_file}: {plan.get('format')!r} version {plan.get('version')!r}; this "
                              f"runtime reads {BUNDLE_FORMAT['name']!r} version {BUNDLE_FORMAT['version']}: "
                              "export the bundle again with the matching stagejax")
        _check_target(plan["target"], plan_file)
        module = path / plan["module"]["file"]
        if not module.is_file():
            raise BundleError(f"the bundle's module {module} is missing: copy the whole bundle "
                              "directory, or export it again")
        digest = hashlib.sha256(module.read_bytes()).hexdigest()
        if digest != plan["module"]["sha256"]:
            raise BundleError(f"the bundle's module {module} is corrupt or was replaced (sha256 "
                              f"{digest[:16]}…, {PLAN_FILE} expects {plan['module']['sha256'][:16]}…): "
                              "export the bundle again")
        if checkpoint is None:
            checkpoint = Path(plan["checkpoint"]["path"])
            if not checkpoint.is_absolute():
                checkpoint = path / checkpoint
        checkpoint = Path(checkpoint)
        expected = plan["checkpoint"]["manifest_sha256"]
        found = manifest_sha256(checkpoint)
        if found != expected:
            raise BundleError(
                f"the checkpoint {checkpoint} is not the one this bundle was planned for: its "
                f"manifest's sha256 is {found[:16]}…, the bundle's plan expects {expected[:16]}… "
                f"({plan['checkpoint']['model_name']}); point --checkpoint at that checkpoint, or "
                "export the bundle again for this one")
        return cls(path, plan, checkpoint)


def _check_target(target: dict, plan_file: Path) -> None:
    arch = machine_arch()
    if target["arch"] != arch:
        raise BundleError(f"{plan_file}: the module was compiled for {target['arch']} "
                          f"({target['name']}, IREE flags {' '.join(target['flags'])}), and this "
                          f"machine is {arch}: export with export.target matching this machine "
                          "(export.target=host when exporting on it)")
    missing = sorted(set(target.get("cpu_flags") or ()) - machine_cpu_flags())
    significant = [f for f in missing if f.startswith(("avx", "fma", "sse", "f16c", "bmi", "asimd", "sve"))]
    if significant:
        raise BundleError(f"{plan_file}: the module was compiled for a CPU with {', '.join(significant)}, "
                          "which this machine lacks: export on this machine (export.target=host) or "
                          "for a generic target")
