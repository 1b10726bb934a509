"""Bodies of the RPC messages (Notify, Probe, Connection) as plain JSON values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from ..errors import MalformedMessage

__all__ = [
    "EMPTY_CONNECTION_REPLY",
    "NOTIFY_ACK",
    "PROBE_REPLY",
    "PROBE_REQUEST",
    "NotifyMessage",
    "decode_notify",
    "encode_notify",
]

#: What a TCP-only reference engine answers to a Connection (RDMA QP) request.
EMPTY_CONNECTION_REPLY: Final[dict[str, Any]] = {
    "local_gid": "",
    "local_lid": 0,
    "local_nic_path": "",
    "payload": "",
    "peer_nic_path": "",
    "qp_num": [],
    "reply_msg": "",
}
PROBE_REQUEST: Final[dict[str, Any]] = {}
PROBE_REPLY: Final[dict[str, Any]] = {"status": "success"}


@dataclass(frozen=True, slots=True)
class NotifyMessage:
    """``TransferMetadata::NotifyDesc``: a name and a message string."""

    name: str
    notify_msg: str


#: Reply to an accepted Notify; an empty ``notify_msg`` means rejection.
NOTIFY_ACK: Final = NotifyMessage("", "success")


def encode_notify(msg: NotifyMessage) -> dict[str, Any]:
    return {"name": msg.name, "notify_msg": msg.notify_msg}


def decode_notify(obj: Any) -> NotifyMessage:
    if not isinstance(obj, dict):
        raise MalformedMessage("Notify body must be a JSON object")
    name = obj.get("name", "")
    text = obj.get("notify_msg", "")
    if not isinstance(name, str) or not isinstance(text, str):
        raise MalformedMessage("Notify fields 'name' and 'notify_msg' must be strings")
    return NotifyMessage(name, text)
