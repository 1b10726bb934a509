"""Doctor checks of this host: protocol, RDMA settings and devices, memory limits.

RDMA devices are read the way ``ibv_devinfo`` shows them, from sysfs:
``class/infiniband/<dev>/ports/<port>/{state,phys_state,link_layer}``, the GID
table ``gids/<index>`` with ``gid_attrs/{types,ndevs}/<index>``, and the verbs
character device named by ``class/infiniband_verbs/uverbs*/ibdev``.  The roots
are injectable (:class:`SystemProbes`), so tests build fake trees with a DOWN
port or an all-zero GID.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from ..transfer.transports import TRANSPORTS
from ..transfer.transports import unavailable_reason as _unavailable_reason
from ._inputs import DoctorInputs
from ._probes import Probes
from ._report import CheckResult, Status

__all__ = [
    "check_max_map_count",
    "check_memlock",
    "check_protocol",
    "check_rdma_devices",
    "check_rdma_env",
    "matrix_devices",
]

#: MC_MTU values the reference accepts (config.cpp); others are ignored with an error
_MTUS: Final = (512, 1024, 2048, 4096)
#: kernel iboe_get_mtu(): RoCE headers (GRH 40 + UDP 8 + BTH 12 + XRC 4 + AtomicETH 28 + ICRC 4)
_ROCE_OVERHEAD: Final = 96
#: the kernel's default vm.max_map_count (DEFAULT_MAX_MAP_COUNT)
_DEFAULT_MAX_MAP_COUNT: Final = 65530
#: mappings the doctor keeps free for the rest of the process (libraries, threads, allocators)
_MAP_HEADROOM: Final = 1024
_ZERO_GID: Final = "0000:0000:0000:0000:0000:0000:0000:0000"
_UNLIMITED: Final = -1


def check_protocol(inputs: DoctorInputs) -> CheckResult:
    """Which transport will move the data."""
    p = inputs.protocol
    if p in TRANSPORTS:
        return CheckResult("protocol", Status.PASS, f"protocol {p!r} is served by pymooncake")
    reason = _unavailable_reason(p)
    if reason.startswith("no transport serves"):
        return CheckResult(
            "protocol",
            Status.WARN,
            f"unknown protocol {p!r} (a typo?); pymooncake moves data over tcp",
            "use tcp (or rdma for reference engines with RDMA NICs)",
        )
    return CheckResult(
        "protocol",
        Status.WARN,
        f"protocol {p!r} requested: pymooncake moves data over tcp ({reason})",
        "set protocol to tcp on every node that talks to pymooncake nodes",
    )


def _int_env(env: Mapping[str, str], name: str) -> tuple[int | None, str | None]:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return None, None
    try:
        return int(raw.strip(), 10), None
    except ValueError:
        return None, f"{name}={raw!r} is not an integer"


def rdma_settings(env: Mapping[str, str]) -> tuple[int, int | None, int, list[str]]:
    """(ib_port, gid_index or None for auto, mtu, problems) from MC_IB_PORT,
    MC_GID_INDEX (fallback NCCL_IB_GID_INDEX) and MC_MTU, with the reference's
    ranges (config.cpp)."""
    problems: list[str] = []
    port, err = _int_env(env, "MC_IB_PORT")
    if err:
        problems.append(err)
    if port is not None and not 0 < port < 256:
        problems.append(f"MC_IB_PORT={port} is outside 1..255 (IB ports are 1-based)")
        port = None
    gid_var = "MC_GID_INDEX" if env.get("MC_GID_INDEX", "").strip() else "NCCL_IB_GID_INDEX"
    gid, err = _int_env(env, gid_var)
    if err:
        problems.append(err)
    if gid is not None and not 0 <= gid < 256:
        problems.append(f"{gid_var}={gid} is outside 0..255")
        gid = None
    mtu, err = _int_env(env, "MC_MTU")
    if err:
        problems.append(err)
    if mtu is not None and mtu not in _MTUS:
        problems.append(f"MC_MTU={mtu} is not one of 512|1024|2048|4096")
        mtu = None
    return port or 1, gid, mtu or 4096, problems


def check_rdma_env(inputs: DoctorInputs) -> CheckResult:
    """MC_MTU / MC_GID_INDEX / MC_IB_PORT hold values the engine accepts."""
    port, gid, mtu, problems = rdma_settings(inputs.env)
    details = {"ib_port": port, "gid_index": gid, "mtu": mtu}
    if problems:
        return CheckResult(
            "rdma_env",
            Status.FAIL,
            "; ".join(problems)
            + ": the reference engine ignores such values ('Ignore value from environment "
            "variable ...') and falls back to its defaults",
            "MC_MTU must be 512, 1024, 2048 or 4096 (at most the port's active MTU); "
            "MC_GID_INDEX 0..255 (see `show_gids`); MC_IB_PORT the 1-based HCA port",
            details,
        )
    shown = f"MTU {mtu}, GID index {'auto' if gid is None else gid}, IB port {port}"
    return CheckResult("rdma_env", Status.PASS, f"RDMA settings usable: {shown}", details=details)


def matrix_devices(text: str) -> tuple[list[str], str]:
    """Device names of a NIC priority matrix (JSON text or a file path), and an
    error message ('' when fine).  Format: ``{location: [[preferred], [available]]}``."""
    raw = text
    if not text.lstrip().startswith("{"):
        try:
            with open(text, encoding="utf-8") as f:
                raw = f.read()
        except OSError as exc:
            return [], f"cannot read the NIC priority matrix file {text!r}: {exc.strerror}"
    try:
        matrix = json.loads(raw)
    except ValueError as exc:
        return [], f"the NIC priority matrix is not valid JSON: {exc}"
    if not isinstance(matrix, dict):
        return [], "the NIC priority matrix must be a JSON object {location: [[...], [...]]}"
    names: list[str] = []
    for location, lists in matrix.items():
        if (
            not isinstance(lists, list)
            or len(lists) != 2
            or not all(isinstance(x, list) and all(isinstance(d, str) for d in x) for x in lists)
        ):
            return [], (
                f"NIC priority matrix entry {location!r} must be two lists of device names "
                "[[preferred], [available]]"
            )
        for d in (*lists[0], *lists[1]):
            if d not in names:
                names.append(d)
    return names, ""


def _state(text: str | None) -> str:
    """``4: ACTIVE`` -> ``ACTIVE``."""
    return (text or "missing").split(":", 1)[-1].strip()


def _uverbs_for(probes: Probes) -> dict[str, str]:
    out = {}
    for entry in probes.list_sys("class/infiniband_verbs") or []:
        ibdev = probes.read_sys(f"class/infiniband_verbs/{entry}/ibdev")
        if ibdev:
            out[ibdev] = entry
    return out


def _pick_gid(probes: Probes, base: str, wanted: int | None) -> tuple[int | None, str, str]:
    """(index, gid, type) of the GID the engine would use; index None when no
    usable GID exists.  Auto picks a routable RoCE v2 GID first, as the
    reference's GID probe ranks them."""
    if wanted is not None:
        gid = probes.read_sys(f"{base}/gids/{wanted}") or _ZERO_GID
        kind = probes.read_sys(f"{base}/gid_attrs/types/{wanted}") or ""
        return (wanted if gid != _ZERO_GID else None), gid, kind
    best: tuple[int, int, str, str] | None = None
    for entry in probes.list_sys(f"{base}/gids") or []:
        if not entry.isdigit():
            continue
        idx = int(entry)
        gid = probes.read_sys(f"{base}/gids/{entry}") or _ZERO_GID
        if gid == _ZERO_GID:
            continue
        kind = probes.read_sys(f"{base}/gid_attrs/types/{entry}") or ""
        mapped_v4 = gid.startswith("0000:0000:0000:0000:0000:ffff:")
        rank = (0 if "v2" in kind.lower() else 2) + (0 if mapped_v4 else 1)
        if best is None or (rank, idx) < (best[0], best[1]):
            best = (rank, idx, gid, kind)
    if best is None:
        return None, _ZERO_GID, ""
    return best[1], best[2], best[3]


def _active_mtu(probes: Probes, base: str, gid_index: int | None) -> int | None:
    """A RoCE port's active MTU from its netdev's MTU (kernel iboe_get_mtu)."""
    if gid_index is None:
        return None
    ndev = probes.read_sys(f"{base}/gid_attrs/ndevs/{gid_index}")
    if not ndev:
        return None
    raw = probes.read_sys(f"class/net/{ndev}/mtu")
    if not raw or not raw.isdigit():
        return None
    usable = int(raw) - _ROCE_OVERHEAD
    fitting = [m for m in (256, *_MTUS) if m <= usable]
    return max(fitting) if fitting else 256


def check_rdma_devices(inputs: DoctorInputs, probes: Probes) -> list[CheckResult]:
    """Every device of device_name / the NIC priority matrix exists, has an
    ACTIVE port (MC_IB_PORT) and a non-zero GID (MC_GID_INDEX or auto)."""
    if not inputs.rdma:
        return [
            CheckResult(
                "rdma_devices",
                Status.SKIP,
                f"protocol {inputs.protocol!r} and no device_name / NIC priority matrix: RDMA "
                "devices are not used",
            )
        ]
    results: list[CheckResult] = []
    wanted = [d for d in inputs.device_names if d.lower() not in ("auto", "auto-discovery")]
    if inputs.nic_priority_matrix:
        names, err = matrix_devices(inputs.nic_priority_matrix)
        if err:
            results.append(
                CheckResult(
                    "nic_priority_matrix",
                    Status.FAIL,
                    err,
                    'fix the matrix (format {"cpu:0": [["mlx5_0"], []]})',
                )
            )
        wanted += [n for n in names if n not in wanted]
    present = probes.list_sys("class/infiniband") or []
    if not wanted:
        wanted = present
    if not wanted:
        results.append(
            CheckResult(
                "rdma_devices",
                Status.FAIL,
                "No matched device found: there are no RDMA devices under /sys/class/infiniband",
                "install the NIC driver (ibv_devinfo lists the devices), or use protocol tcp",
            )
        )
        return results
    port, gid_index, mtu, _problems = rdma_settings(inputs.env)
    uverbs = _uverbs_for(probes)
    for dev in wanted:
        results.append(_check_device(probes, dev, present, uverbs, port, gid_index, mtu))
    return results


def _check_device(
    probes: Probes,
    dev: str,
    present: list[str],
    uverbs: dict[str, str],
    port: int,
    gid_index: int | None,
    mtu: int,
) -> CheckResult:
    check = f"rdma_device:{dev}"
    if dev not in present:
        return CheckResult(
            check,
            Status.FAIL,
            f"No matched device found: {dev!r} is not an RDMA device of this host (present: "
            f"{', '.join(present) or 'none'})",
            "fix device_name / the NIC priority matrix (ibv_devinfo lists the devices)",
            {"present": present},
        )
    base = f"class/infiniband/{dev}/ports/{port}"
    ports = probes.list_sys(f"class/infiniband/{dev}/ports") or []
    state = probes.read_sys(f"{base}/state")
    details: dict[str, Any] = {"port": port, "ports": ports}
    if state is None:
        return CheckResult(
            check,
            Status.FAIL,
            f"Device {dev} port {port} not active: the device has no port {port} (ports: "
            f"{', '.join(ports) or 'none'})",
            "set MC_IB_PORT to one of the device's ports",
            details,
        )
    phys = _state(probes.read_sys(f"{base}/phys_state"))
    details.update(state=_state(state), phys_state=phys)
    if _state(state) != "ACTIVE":
        others = [
            p
            for p in ports
            if p != str(port)
            and _state(probes.read_sys(f"class/infiniband/{dev}/ports/{p}/state")) == "ACTIVE"
        ]
        alt = f"; port(s) {', '.join(others)} are ACTIVE: set MC_IB_PORT" if others else ""
        return CheckResult(
            check,
            Status.FAIL,
            f"Device {dev} port {port} not active (state {_state(state)}, physical state "
            f"{phys}){alt}",
            "check the cable and the switch port, and that the driver and subnet manager "
            "(InfiniBand) are up; `ibv_devinfo -d " + dev + "` shows the port state",
            details,
        )
    idx, gid, kind = _pick_gid(probes, base, gid_index)
    details.update(gid_index=idx, gid=gid, gid_type=kind)
    if idx is None:
        where = f"index {gid_index} (MC_GID_INDEX)" if gid_index is not None else "every index"
        return CheckResult(
            check,
            Status.FAIL,
            f"GID is NULL: device {dev} port {port} has an all-zero GID at {where} (RDMA "
            f"device: {dev}, GID: ({gid_index if gid_index is not None else '-'}) {gid})",
            "choose the right GID index for the network and set MC_GID_INDEX (`show_gids` "
            "lists them; RoCE v2 with an IPv4-mapped GID is usual), or configure an address "
            "on the port's netdev",
            details,
        )
    problems: list[str] = []
    if dev not in uverbs:
        problems.append(
            "no verbs character device names it (class/infiniband_verbs/*/ibdev): the engine "
            "skips devices without an accessible /dev/infiniband/uverbs*"
        )
    elif not probes.dev_exists(f"infiniband/{uverbs[dev]}"):
        problems.append(f"/dev/infiniband/{uverbs[dev]} is missing (in a container: pass it in)")
    active = _active_mtu(probes, base, idx)
    details["active_mtu"] = active
    if active is not None and mtu > active:
        problems.append(
            f"MC_MTU {mtu} exceeds the port's active MTU {active}: the engine uses {active}; "
            "peers must agree (Failed to modify QP to RTR, check mtu ...)"
        )
    summary = f"port {port} ACTIVE, GID ({idx}) {gid}" + (f" {kind}" if kind else "")
    if problems:
        return CheckResult(
            check,
            Status.WARN,
            f"{dev}: {summary}; but " + "; ".join(problems),
            "set MC_MTU to at most the active MTU on every node; expose the verbs device",
            details,
        )
    return CheckResult(check, Status.PASS, f"{dev}: {summary}", details=details)


# --- memory limits ---------------------------------------------------------------------


def _limits_row(text: str | None, title: str) -> tuple[int, int] | None:
    """(soft, hard) of a ``/proc/<pid>/limits`` row; -1 = unlimited."""
    for line in (text or "").splitlines():
        if line.startswith(title):
            fields = line[len(title) :].split()
            if len(fields) >= 2:
                try:
                    return tuple(  # type: ignore[return-value]
                        _UNLIMITED if f == "unlimited" else int(f) for f in fields[:2]
                    )
                except ValueError:
                    return None
    return None


def _has_cap_ipc_lock(status: str | None) -> bool:
    """CAP_IPC_LOCK (bit 14) in CapEff of ``/proc/self/status``."""
    for line in (status or "").splitlines():
        if line.startswith("CapEff:"):
            try:
                return bool(int(line.split()[1], 16) & (1 << 14))
            except (IndexError, ValueError):
                return False
    return False


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def check_memlock(inputs: DoctorInputs, probes: Probes) -> CheckResult:
    """RLIMIT_MEMLOCK covers the memory RDMA registration pins."""
    need = inputs.registered_bytes
    limits = _limits_row(probes.read_proc("self/limits"), "Max locked memory")
    if limits is None:
        return CheckResult("memlock", Status.SKIP, "cannot read /proc/self/limits")
    soft, hard = limits
    cap = _has_cap_ipc_lock(probes.read_proc("self/status"))
    shown = "unlimited" if soft == _UNLIMITED else _human(soft)
    details = {"soft": soft, "hard": hard, "need": need, "cap_ipc_lock": cap}
    enough = soft == _UNLIMITED or cap or soft >= need
    if not inputs.rdma:
        return CheckResult(
            "memlock",
            Status.PASS,
            f"locked-memory limit {shown}; protocol {inputs.protocol!r} pins no memory"
            + ("" if enough or not need else " (RDMA engines on this host would need more)"),
            details=details,
        )
    if not need:
        return CheckResult(
            "memlock",
            Status.PASS if enough or soft == _UNLIMITED else Status.WARN,
            f"locked-memory limit {shown}"
            + (" (CAP_IPC_LOCK lifts it)" if cap and soft != _UNLIMITED else "")
            + "; no memory size given (--global-segment-size/--local-buffer-size) to compare with",
            "" if soft == _UNLIMITED or cap else "ulimit -l unlimited for RDMA",
            details,
        )
    if enough:
        why = "CAP_IPC_LOCK lifts the limit" if cap and soft != _UNLIMITED else f"limit {shown}"
        return CheckResult(
            "memlock",
            Status.PASS,
            f"{_human(need)} to register fits the locked-memory limit ({why})",
            details=details,
        )
    return CheckResult(
        "memlock",
        Status.FAIL,
        f"the locked-memory limit (RLIMIT_MEMLOCK) is {shown}, below the {_human(need)} to "
        "register (global_segment_size + local_buffer_size): memory registration fails "
        "(Failed to register memory: Cannot allocate memory)",
        "raise it: `ulimit -l unlimited`, LimitMEMLOCK=infinity (systemd), memlock in "
        "/etc/security/limits.conf, or `--ulimit memlock=-1` (docker)",
        details,
    )


def check_max_map_count(inputs: DoctorInputs, probes: Probes) -> CheckResult:
    """vm.max_map_count leaves room for the mappings a node creates."""
    raw = probes.read_proc("sys/vm/max_map_count")
    if raw is None or not raw.strip().isdigit():
        return CheckResult("max_map_count", Status.SKIP, "cannot read /proc/sys/vm/max_map_count")
    limit = int(raw)
    maps = probes.read_proc("self/maps")
    used = len(maps.splitlines()) if maps else 0
    # one mapping per registered region, split at MC_MAX_MR_SIZE for RDMA (reference)
    chunk = 1 << 40
    mr = inputs.env.get("MC_MAX_MR_SIZE", "").strip()
    if inputs.rdma and mr.isdigit() and int(mr) > 0:
        chunk = int(mr)
    planned = sum(
        -(-size // chunk) for size in (inputs.global_segment_size, inputs.local_buffer_size) if size
    )
    need = used + planned + _MAP_HEADROOM
    details = {"limit": limit, "used": used, "planned": planned, "headroom": _MAP_HEADROOM}
    if limit < need:
        return CheckResult(
            "max_map_count",
            Status.FAIL,
            f"vm.max_map_count={limit} leaves no room: this process already has {used} "
            f"mappings, registration adds {planned}, and {_MAP_HEADROOM} are kept for the "
            "process; mmap fails with ENOMEM once the limit is reached",
            f"sysctl -w vm.max_map_count={max(_DEFAULT_MAX_MAP_COUNT, need * 2)} (persist it in "
            "/etc/sysctl.d/)",
            details,
        )
    if limit < _DEFAULT_MAX_MAP_COUNT:
        return CheckResult(
            "max_map_count",
            Status.WARN,
            f"vm.max_map_count={limit} is below the kernel default {_DEFAULT_MAX_MAP_COUNT}; "
            "frameworks loaded next to the store (PyTorch, CUDA) use many mappings",
            f"sysctl -w vm.max_map_count={_DEFAULT_MAX_MAP_COUNT}",
            details,
        )
    return CheckResult(
        "max_map_count",
        Status.PASS,
        f"vm.max_map_count={limit}: {used} mappings in use here, {planned} to add",
        details=details,
    )
