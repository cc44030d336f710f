"""Device profiles: the roofline constants of a machine, from `conf/device/*.yaml` or calibration.

Owns reading the `device/` config group (design §6). A profile YAML mirrors the
fields of `stagejax.roofline.Device`:

    name: jetson_orin_nano
    calibrated: false             # published figures (true: measure this machine)
    source: "NVIDIA Jetson Orin Nano Series data sheet (DS-11105-001), ..."
    flops_per_s: {float32: 1.28e12, bfloat16: 1.0e13, int8: 2.0e13}
    mem_read_bytes_per_s: 68.0e9
    storage_read_bytes_per_s: 2.0e9
    storage_warm_bytes_per_s: 2.7e10
    call_overhead_s: 1.0e-5
    ram_bytes: 8.59e9
    matvec_bytes_per_s: null      # optional
    notes: {mem_read_bytes_per_s: "where the figure comes from, or that it is an estimate"}

`this_machine.yaml` instead says `calibrated: true`: its constants come from
`stagejax.calibration.calibrate` (measured once per machine and cached).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml

from stagejax.roofline import Device

DEVICE_CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "device"
_FIELDS = {f.name for f in dataclasses.fields(Device)}
_REQUIRED = {"name", "flops_per_s", "mem_read_bytes_per_s", "storage_read_bytes_per_s",
             "storage_warm_bytes_per_s", "call_overhead_s", "ram_bytes", "source"}
_NUMBERS = {"mem_read_bytes_per_s", "storage_read_bytes_per_s", "storage_warm_bytes_per_s",
            "call_overhead_s", "ram_bytes", "matvec_bytes_per_s", "llc_bytes"}


def list_devices(conf_dir: Path = DEVICE_CONF_DIR) -> list[str]:
    """Names of the profiles in `conf_dir`."""
    return sorted(p.stem for p in Path(conf_dir).glob("*.yaml"))


def _number(value, where: str) -> float:
    # YAML 1.1 reads "1e9" (no dot) as a string; accept it, refuse anything else.
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, got {value!r}") from None
    return number


def device_from_mapping(data: dict, origin: str) -> Device:
    """A Device from a profile's mapping; errors name `origin` and the offending key."""
    if not isinstance(data, dict):
        raise ValueError(f"device profile {origin} must be a mapping of Device fields, got "
                         f"{type(data).__name__}")
    unknown = set(data) - _FIELDS - {"calibrated"}
    if unknown:
        raise ValueError(f"device profile {origin} has unknown keys {sorted(unknown)}; "
                         f"allowed: {sorted(_FIELDS)}")
    missing = _REQUIRED - set(data)
    if missing:
        raise ValueError(f"device profile {origin} lacks {sorted(missing)} (every profile needs "
                         f"{sorted(_REQUIRED)}; cite a source for each figure in `notes`)")
    fields = dict(data)
    fields.pop("calibrated", None)
    flops = fields["flops_per_s"]
    if not isinstance(flops, dict) or not flops:
        raise ValueError(f"device profile {origin}: flops_per_s must map dtypes to FLOP/s, "
                         f"e.g. {{float32: 1.0e12}}, got {flops!r}")
    fields["flops_per_s"] = {str(k): _number(v, f"{origin}: flops_per_s.{k}") for k, v in flops.items()}
    for key in _NUMBERS & set(fields):
        if fields[key] is not None:
            fields[key] = _number(fields[key], f"{origin}: {key}")
    fields["notes"] = {str(k): str(v) for k, v in (fields.get("notes") or {}).items()}
    fields["name"], fields["source"] = str(fields["name"]), str(fields["source"])
    try:
        return Device(**fields)
    except ValueError as error:
        raise ValueError(f"device profile {origin}: {error}") from None


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"device profile {path} is not valid YAML: {error}") from None
    return data if data is not None else {}


def load_device(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
                conf_dir: Path = DEVICE_CONF_DIR, quick: bool = False) -> Device:
    """The Device of a profile name (`conf/device/<name>.yaml`) or a YAML file path.

    A profile with `calibrated: true` (`this_machine`) is measured by
    `stagejax.calibration.calibrate(cache_dir)` — cached per machine, so only the first call
    takes time (`quick` for a shorter first calibration). `cache_dir` defaults to
    $STAGEJAX_CACHE or ~/.cache/stagejax, like the run's `paths.cache`.
    """
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        path = candidate
    else:
        path = Path(conf_dir) / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no device profile {str(name_or_path)!r} ({path} does not exist); "
                                f"known profiles: {', '.join(list_devices(conf_dir)) or 'none'}")
    data = _read_yaml(path)
    if isinstance(data, dict) and data.get("calibrated"):
        from stagejax.calibration import calibrate  # measures with jax: only when asked

        cache = Path(cache_dir or os.environ.get("STAGEJAX_CACHE") or Path.home() / ".cache" / "stagejax")
        device = calibrate(cache, quick=quick)
        return dataclasses.replace(device, name=str(data.get("name", device.name)))
    return device_from_mapping(data, str(path))


def device_from_settings(settings, cache_dir: str | os.PathLike | None = None) -> Device:
    """The Device of a composed `device/` config group (a dataclass or mapping with the profile's
    keys): calibrated profiles are measured (cached), others validated like a YAML profile."""
    data = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings)
    if data.get("calibrated"):
        from stagejax.calibration import calibrate

        cache = Path(cache_dir or os.environ.get("STAGEJAX_CACHE") or Path.home() / ".cache" / "stagejax")
        return dataclasses.replace(calibrate(cache), name=str(data.get("name") or "this_machine"))
    data = {k: v for k, v in data.items() if v is not None and k != "calibrated"}
    return device_from_mapping(data, f"device settings {data.get('name', '?')!r}")
