"""Operations: ``pymooncake doctor`` as a library.

Public names::

    run_doctor(inputs, probes=None) -> DoctorReport
    DoctorInputs        a node's settings (DoctorInputs.from_sources(flags, env, file))
    DoctorReport        results, .ok, .exit_code, .format_text(), .to_json()
    CheckResult, Status one check's verdict (PASS / WARN / FAIL / SKIP)
    Probes, SystemProbes, Reach
                        how checks ask the machine (inject fakes or fake /sys roots)

Example::

    from pymooncake.ops import DoctorInputs, run_doctor
    inputs = DoctorInputs(local_hostname="10.0.0.5", metadata_server="http://10.0.0.1:8080/metadata",
                          peers=("10.0.0.6:15001",))
    report = run_doctor(inputs)
    print(report.format_text())
"""

from ._doctor import run_doctor
from ._inputs import DoctorInputs
from ._probes import Probes, Reach, SystemProbes
from ._report import CheckResult, DoctorReport, Status

__all__ = [
    "CheckResult",
    "DoctorInputs",
    "DoctorReport",
    "Probes",
    "Reach",
    "Status",
    "SystemProbes",
    "run_doctor",
]
