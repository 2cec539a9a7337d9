"""This machine's CPU, and whether a CPU profile was measured on it.

A CPU profile's timings hold only on the CPU model that measured them (ENV.md: real runs of
one command differed by up to 60 % between an Intel with AMX and an AMD EPYC without), so
`pipedec-real profile` records the host in `provenance.host` and the programs warn when a
CPU profile (devices.kind "cpu") comes from another CPU model than this machine's.

Standard library only (the simulator imports this): /proc/cpuinfo, else `lscpu`, else
`platform`. Nothing here raises on an unusual machine: unknown fields are left out.
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# Instruction-set flags that change CPU kernel speed (matmul paths of torch's CPU backend):
# recorded so that two hosts sharing a generic model name ("Intel(R) Xeon(R) Processor"
# under KVM) can still be told apart.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def parse_cpuinfo(text: str) -> dict:
    """The first processor block of /proc/cpuinfo text: model name, vendor, family/model/
    stepping and the ISA flags of interest (keys absent where the file lacks them)."""
    block: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if block:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            block.setdefault(key.strip().lower(), value.strip())
    out: dict = {}
    if block.get("model name"):
        out["cpu_model"] = block["model name"]
    if block.get("vendor_id"):
        out["cpu_vendor"] = block["vendor_id"]
    ident = [f"{k} {block[k2]}" for k, k2 in (("family", "cpu family"), ("model", "model"),
                                               ("stepping", "stepping")) if block.get(k2)]
    if ident:
        out["cpu_id"] = " ".join(ident)
    flags = (block.get("flags") or block.get("features") or "").split()
    if flags:
        out["isa"] = [f for f in ISA_FLAGS if f in flags]
    return out


def parse_lscpu(text: str) -> dict:
    """`lscpu` output: its "Model name" and "Vendor ID" lines."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep or not value.strip():
            continue
        key = key.strip().lower()
        if key == "model name":
            out.setdefault("cpu_model", value.strip())
        elif key == "vendor id":
            out.setdefault("cpu_vendor", value.strip())
    return out


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """This machine's CPU: cpu_model (lscpu's "Model name"), cpu_vendor, cpu_id, isa."""
    info: dict = {}
    try:
        info = parse_cpuinfo(CPUINFO.read_text(errors="replace"))
    except OSError:
        pass
    if "cpu_model" not in info:           # e.g. arm64, where /proc/cpuinfo has no model name
        try:
            res = subprocess.run(["lscpu"], check=False, capture_output=True, text=True,
                                 timeout=5, env={**os.environ, "LC_ALL": "C"})
            info = {**parse_lscpu(res.stdout), **info}
        except (OSError, subprocess.SubprocessError):
            pass
    if "cpu_model" not in info and sys.platform == "darwin":
        try:
            res = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], check=False,
                                 capture_output=True, text=True, timeout=5)
            if res.stdout.strip():
                info["cpu_model"] = res.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    if "cpu_model" not in info and platform.processor():
        info["cpu_model"] = platform.processor()
    return info


def cpu_model() -> str | None:
    """This machine's CPU model name (lscpu "Model name" / /proc/cpuinfo "model name")."""
    return cpu_info().get("cpu_model")


def affinity_cores() -> int | None:
    """Cores this process may run on (cgroup/affinity limits), None where unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def host_record() -> dict:
    """What a measured profile records about its host (`provenance.host`)."""
    rec = dict(cpu_info())
    rec["cpu_count"] = os.cpu_count() or 1
    aff = affinity_cores()
    if aff:
        rec["affinity_cores"] = aff
    rec["machine"] = platform.machine() or "unknown"
    return rec


def describe(host: dict) -> str:
    """One phrase for a `provenance.host` record, e.g. "'AMD EPYC 7B13' (2 cores)"."""
    name = host.get("cpu_model")
    text = repr(name) if name else (host.get("description") or "an unrecorded CPU")
    cores = host.get("affinity_cores") or host.get("cpu_count")
    return f"{text} ({cores} cores)" if cores else text


def host_mismatch(recorded: dict | None, here: dict | None = None) -> str | None:
    """Why `recorded` (a profile's provenance.host) is not this machine's CPU, or None
    when it is. A record without a CPU model name cannot be matched: that says so."""
    here = host_record() if here is None else here
    recorded = recorded or {}
    if not here.get("cpu_model"):
        return None                        # nothing to compare with on this machine
    if not recorded.get("cpu_model"):
        if (recorded.get("cpu_vendor") and here.get("cpu_vendor")
                and recorded["cpu_vendor"] != here["cpu_vendor"]):
            return "another CPU vendor"
        return "no CPU model recorded"
    if recorded["cpu_model"] != here["cpu_model"]:
        return "another CPU model"
    for key, what in (("cpu_id", "CPU family/model/stepping"), ("isa", "instruction set")):
        if key in recorded and key in here and recorded[key] != here[key]:
            return f"another {what}"
    cores = (recorded.get("affinity_cores") or recorded.get("cpu_count"),
             here.get("affinity_cores") or here.get("cpu_count"))
    if all(cores) and cores[0] != cores[1]:
        return "another core count"
    return None


def profile_host_warning(profile, here: dict | None = None) -> str | None:
    """A one-line warning if `profile` is a CPU profile measured on another CPU than this
    machine's (or one that does not say which); None for GPU/analytic profiles or a match."""
    if getattr(profile, "device_kind", None) != "cpu":
        return None
    prov = getattr(profile, "provenance", None) or {}
    if prov.get("kind") != "measured":
        return None
    here = host_record() if here is None else here
    recorded = prov.get("host") or {}
    why = host_mismatch(recorded, here)
    if why is None:
        return None
    name = getattr(profile, "name", "?")
    if recorded.get("cpu_model") or why == "another CPU vendor":
        there = f"was measured on {describe(recorded)}, {why} than"
    else:
        said = recorded.get("description") or prov.get("device")
        there = "does not record the CPU model it was measured on" + (
            f" ({said})" if said else "") + "; compare with"
    return (f"warning: CPU profile {name} {there} this machine's {describe(here)}: a CPU "
            f"profile holds only on the host that measured it (CPU models differ by up to "
            f"60 %); measure one here with `pipedec-real profile`")


def warn_profile_host(profile, prog: str | None = None, file=None) -> str | None:
    """Print `profile_host_warning` (one line on stderr, prefixed by `prog`) if any; the
    caller goes on. Returns the warning."""
    msg = profile_host_warning(profile)
    if msg:
        print(f"{prog}: {msg}" if prog else msg, file=file or sys.stderr)
    return msg
