"""Typed master replies (``wire/_master_reply_msgs.py``): every reply type encodes
to exactly the bytes the master has always sent, decodes back to itself, and
refuses anything else with InvalidReply naming the method and the field."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymooncake.errors import MalformedMessage
from pymooncake.wire import _master_msgs as msg
from pymooncake.wire import _master_reply_msgs as r
from pymooncake.wire._master import encode_json, encode_reply
from pymooncake.wire._master_replies import ReplicaColumns

REP = [4398046511104, "127.0.0.1:17001", 140000000000, 4096, 3, "seg-a"]
REP2 = [4398046511168, "127.0.0.1:17002", 140000004096, 4096, 2, "seg-b"]

#: reply type -> (a value as the master sends it, its exact JSON text)
EXAMPLES: dict[type[r.Reply], tuple[Any, str]] = {
    r.ServiceReadyReply: ("pymooncake-master/2", '"pymooncake-master/2"'),
    r.GetSummaryReply: (
        {
            "capacity_bytes": 1073741824,
            "allocated_bytes": 8192,
            "key_count": 2,
            "segment_count": 1,
            "client_count": 1,
            "soft_pinned_keys": 0,
            "ssd": {"local_disks": 1, "disk_replicas": 0},
        },
        '{"capacity_bytes":1073741824,"allocated_bytes":8192,"key_count":2,'
        '"segment_count":1,"client_count":1,"soft_pinned_keys":0,'
        '"ssd":{"local_disks":1,"disk_replicas":0}}',
    ),
    r.PingReply: (
        {
            "view_version": 3,
            "status": 1,
            "instance": "a1b2",
            "tasks": 2,
            "standbys": ["10.0.0.2:50051"],
            "client_ttl_ms": 10000,
        },
        '{"view_version":3,"status":1,"instance":"a1b2","tasks":2,"standbys":["10.0.0.2:50051"],'
        '"client_ttl_ms":10000}',
    ),
    r.HaConfirmReply: ({"missing": ["k2"]}, '{"missing":["k2"]}'),
    r.MountSegmentReply: (None, "null"),
    r.ReMountSegmentReply: (None, "null"),
    r.UnmountSegmentReply: (7, "7"),
    r.PutStartReply: (
        [REP, REP2],
        '[[4398046511104,"127.0.0.1:17001",140000000000,4096,3,"seg-a"],'
        '[4398046511168,"127.0.0.1:17002",140000004096,4096,2,"seg-b"]]',
    ),
    r.UpsertStartReply: ([REP], '[[4398046511104,"127.0.0.1:17001",140000000000,4096,3,"seg-a"]]'),
    r.PromotionAllocStartReply: ([], "[]"),
    r.PutEndReply: (None, "null"),
    r.ReserveSlotsReply: (
        {
            "cols": {
                "k": 2,
                "code": 0,
                "msg": [],
                "segs": [["127.0.0.1:17001", "seg-a", 1, 139999999936]],
                "n": 1,
                "seg": 0,
                "addr": [140000000000, 140000004096],
            },
            "ttl_s": 10.0,
        },
        '{"cols":{"k":2,"code":0,"msg":[],"segs":[["127.0.0.1:17001","seg-a",1,139999999936]],'
        '"n":1,"seg":0,"addr":[140000000000,140000004096]},"ttl_s":10.0}',
    ),
    r.CommitSlotReply: (None, "null"),
    r.BatchCommitSlotsReply: (
        [[0, None], [-706, "object 'k' already exists"]],
        "[[0,null],[-706,\"object 'k' already exists\"]]",
    ),
    r.PutRevokeReply: (None, "null"),
    r.UpsertEndReply: (None, "null"),
    r.UpsertRevokeReply: (None, "null"),
    r.BatchPutStartReply: (
        {
            "k": 3,
            "code": [0, -706, 0],
            "msg": [[1, "object 'k1' already exists"]],
            "segs": [["127.0.0.1:17001", "seg-a", 1, 139999999936]],
            "n": [1, 0, 2],
            "seg": 0,
            "addr": [140000000000, 140000004096, 140000008192],
        },
        '{"k":3,"code":[0,-706,0],"msg":[[1,"object \'k1\' already exists"]],'
        '"segs":[["127.0.0.1:17001","seg-a",1,139999999936]],"n":[1,0,2],'
        '"seg":0,"addr":[140000000000,140000004096,140000008192]}',
    ),
    r.BatchUpsertStartReply: (
        {"k": 0, "code": [], "msg": [], "segs": [], "n": [], "seg": [], "addr": []},
        '{"k":0,"code":[],"msg":[],"segs":[],"n":[],"seg":[],"addr":[]}',
    ),
    r.BatchGetReplicaListReply: (
        {
            "k": 2,
            "code": [0, -704],
            "msg": [[1, "object 'x' not found"]],
            "segs": [["127.0.0.1:17001", "seg-a", 1, 0]],
            "n": [1, 0],
            "seg": 0,
            "addr": [64],
            "size": [4096, 0],
            "lease_ttl_ms": 5000,
        },
        '{"k":2,"code":[0,-704],"msg":[[1,"object \'x\' not found"]],'
        '"segs":[["127.0.0.1:17001","seg-a",1,0]],"n":[1,0],"seg":0,"addr":[64],'
        '"size":[4096,0],"lease_ttl_ms":5000}',
    ),
    r.BatchPutEndReply: (
        [[0, None], [-704, "no put of 'b'"]],
        "[[0,null],[-704,\"no put of 'b'\"]]",
    ),
    r.BatchPutRevokeReply: (1, "1"),
    r.BatchUpsertEndReply: (0, "0"),
    r.BatchUpsertRevokeReply: (3, "3"),
    r.BatchRemoveReply: ([[0, None], [-705, "has a lease"]], '[[0,null],[-705,"has a lease"]]'),
    r.GetReplicaListReply: (
        {"replicas": [REP], "lease_ttl_ms": 5000, "size": 4096},
        '{"replicas":[[4398046511104,"127.0.0.1:17001",140000000000,4096,3,"seg-a"]],'
        '"lease_ttl_ms":5000,"size":4096}',
    ),
    r.GetReplicaListByRegexReply: (
        {"k1": [REP], "k\u00e9": [REP2]},
        '{"k1":[[4398046511104,"127.0.0.1:17001",140000000000,4096,3,"seg-a"]],'
        '"k\u00e9":[[4398046511168,"127.0.0.1:17002",140000004096,4096,2,"seg-b"]]}',
    ),
    r.ExistKeyReply: (True, "true"),
    r.BatchExistKeyReply: ([True, False], "[true,false]"),
    r.RemoveReply: (None, "null"),
    r.RemoveByRegexReply: (12, "12"),
    r.RemoveAllReply: (0, "0"),
    r.BatchReplicaClearReply: (["a", "b"], '["a","b"]'),
    r.FollowFrame: (
        {"seq": 9, "effects": [["del", "k"]], "synced": True},
        '{"seq":9,"effects":[["del","k"]],"synced":true}',
    ),
    r.CreateCopyTaskReply: ([1, 18446744073709551615], "[1,18446744073709551615]"),
    r.CreateMoveTaskReply: ([5, 6], "[5,6]"),
    r.QueryTaskReply: (
        {
            "id": [1, 2],
            "type": 0,
            "status": 2,
            "created_at_ms_epoch": 1700000000000,
            "last_updated_at_ms_epoch": 1700000000500,
            "assigned_client": [3, 4],
            "message": "",
        },
        '{"id":[1,2],"type":0,"status":2,"created_at_ms_epoch":1700000000000,'
        '"last_updated_at_ms_epoch":1700000000500,"assigned_client":[3,4],"message":""}',
    ),
    r.FetchTasksReply: (
        [
            {
                "id": [1, 2],
                "type": 1,
                "key": "k",
                "source": "seg-a",
                "targets": ["seg-b"],
                "created_at_ms_epoch": 1700000000000,
                "max_retry_attempts": 3,
            }
        ],
        '[{"id":[1,2],"type":1,"key":"k","source":"seg-a","targets":["seg-b"],'
        '"created_at_ms_epoch":1700000000000,"max_retry_attempts":3}]',
    ),
    r.MarkTaskToCompleteReply: (None, "null"),
    r.CopyStartReply: (
        {"source": REP, "targets": [REP2]},
        '{"source":[4398046511104,"127.0.0.1:17001",140000000000,4096,3,"seg-a"],'
        '"targets":[[4398046511168,"127.0.0.1:17002",140000004096,4096,2,"seg-b"]]}',
    ),
    r.MoveStartReply: (
        {"source": REP, "targets": []},
        '{"source":[4398046511104,"127.0.0.1:17001",140000000000,4096,3,"seg-a"],"targets":[]}',
    ),
    r.CopyEndReply: (None, "null"),
    r.CopyRevokeReply: (None, "null"),
    r.MoveEndReply: (None, "null"),
    r.MoveRevokeReply: (None, "null"),
    r.MountLocalDiskReply: (None, "null"),
    r.UnmountLocalDiskReply: (3, "3"),
    r.OffloadHeartbeatReply: (
        {"offload": [["k", 4096, "seg-a", 140000000000]], "promote": [["p", 10]], "drop": ["d"]},
        '{"offload":[["k",4096,"seg-a",140000000000]],"promote":[["p",10]],"drop":["d"]}',
    ),
    r.NotifyOffloadSuccessReply: ([0, -706], "[0,-706]"),
    r.BatchEvictDiskReplicaReply: (2, "2"),
    r.GetStorageConfigReply: (
        {"fsdir": "/mnt/kv/c1", "enable_disk_eviction": True, "quota_bytes": 0},
        '{"fsdir":"/mnt/kv/c1","enable_disk_eviction":true,"quota_bytes":0}',
    ),
}

REPLY_CLASSES = sorted(
    {rep for rep in r.REPLY_TYPES.values() if rep is not None}, key=lambda c: c.__name__
)


def test_every_request_has_a_reply_type() -> None:
    for req in msg._ALL:
        rep = req.REPLY
        if req is msg.Ack:
            assert rep is None  # the one one-way message
            continue
        assert rep is not None and issubclass(rep, r.Reply), req.__name__
        assert rep.METHOD is req.METHOD
        assert r.reply_type(req) is rep
    assert set(r.REPLY_TYPES) == set(msg.MasterMethod)


def test_every_reply_type_has_an_example() -> None:
    assert set(EXAMPLES) == set(REPLY_CLASSES)


@pytest.mark.parametrize("cls", REPLY_CLASSES, ids=lambda c: c.__name__)
def test_byte_exact_and_round_trip(cls: type[r.Reply]) -> None:
    value, text = EXAMPLES[cls]
    assert encode_json(value) == text  # the example is what the master sends
    x = cls.decode(json.loads(text))
    assert encode_json(x.to_wire()) == text
    assert x.to_json() == text  # (made by hand where JSON_TEXT says so)
    assert cls.decode(x.to_wire()) == x
    assert encode_reply(7, 0, x.to_wire()) == encode_reply(7, 0, value)


_TEXT = st.text(st.sampled_from(['"', "\\", "\x00", "\x1f", "\u2028", "a", "é", "🔑", ":", "/"]))
_U64 = st.integers(0, (1 << 64) - 1)


@given(
    replicas=st.lists(st.tuples(_U64, _TEXT, _U64, _U64, st.integers(0, 5), _TEXT), max_size=4),
    ttl=_U64,
    size=_U64,
)
def test_a_get_reply_made_by_hand_is_the_json_encoder_s_text(
    replicas: list[tuple[int, str, int, int, int, str]], ttl: int, size: int
) -> None:
    """GetReplicaListReply.to_json (every get's reply, text made without the JSON
    encoder) is exactly what encoding its wire value gives, for any names."""
    x = r.GetReplicaListReply(tuple(replicas), ttl, size)
    assert x.JSON_TEXT
    assert x.to_json() == encode_json(x.to_wire())
    assert r.GetReplicaListReply.decode(json.loads(x.to_json())) == x


def test_optional_fields_left_out_as_before() -> None:
    ping = r.PingReply(1, 1, "i")
    assert encode_json(ping.to_wire()) == '{"view_version":1,"status":1,"instance":"i"}'
    hb = r.OffloadHeartbeatReply((), (), (), remount=True)
    assert encode_json(hb.to_wire()) == '{"remount":true,"offload":[],"promote":[],"drop":[]}'
    assert r.OffloadHeartbeatReply.decode(hb.to_wire()) == hb
    frame = r.FollowFrame(3, ())
    assert encode_json(frame.to_wire()) == '{"seq":3,"effects":[]}'
    summary = r.GetSummaryReply(1, 0, 0, 0, 0, 0)
    assert "ssd" not in summary.to_wire()


def test_columns_decode_keeps_the_lists() -> None:
    value = EXAMPLES[r.BatchGetReplicaListReply][0]
    x = r.BatchGetReplicaListReply.decode(value)
    c = x.columns
    assert isinstance(c, ReplicaColumns) and len(x) == 2
    assert c.addr is value["addr"] and c.code is value["code"]  # no copies per key
    assert c.message(1) == "object 'x' not found" and c.lease_ttl_ms == 5000
    assert list(c.replicas()) == [[("127.0.0.1:17001", 64, "seg-a", (1 << 40) | 1)], []]


@pytest.mark.parametrize(
    ("cls", "value", "names"),
    [
        (r.PutStartReply, [[1, "e", 2, 3, 4]], ("PutStart", "replicas[0]")),
        (r.PutStartReply, [[1, "e", 2, 3, True, "s"]], ("PutStart", "replicas[0]")),
        (r.GetReplicaListReply, {"replicas": [], "size": 1}, ("GetReplicaList", "lease_ttl_ms")),
        # past the inline check of the common shape, the field checks name the fault
        (
            r.GetReplicaListReply,
            {"replicas": [REP, [1, "e", 2, 3, 4]], "lease_ttl_ms": 1, "size": 1},
            ("GetReplicaList", "replicas[1]"),
        ),
        (
            r.GetReplicaListReply,
            {"replicas": [REP], "lease_ttl_ms": 1.0, "size": 1},
            ("GetReplicaList", "lease_ttl_ms"),
        ),
        (
            r.GetReplicaListReply,
            {"replicas": (REP,), "lease_ttl_ms": 1, "size": 1},
            ("GetReplicaList", "replicas"),
        ),
        (r.GetReplicaListReply, [REP], ("GetReplicaList", "reply")),
        (r.PingReply, {"view_version": 1, "status": "1", "instance": ""}, ("Ping", "status")),
        (r.ExistKeyReply, 1, ("ExistKey", "exists")),
        (r.UnmountSegmentReply, True, ("UnmountSegment", "count")),
        (r.RemoveReply, 0, ("Remove", "value")),
        (r.ReserveSlotsReply, {"cols": {}, "ttl_s": -1}, ("ReserveSlots", "ttl_s")),
        (
            r.ReserveSlotsReply,
            {"cols": EXAMPLES[r.BatchPutStartReply][0], "ttl_s": 1},
            ("ReserveSlots", "cols.code"),
        ),
        (
            r.BatchGetReplicaListReply,
            {**EXAMPLES[r.BatchGetReplicaListReply][0], "seg": [1]},
            ("BatchGetReplicaList", "seg"),
        ),
        (
            r.BatchGetReplicaListReply,
            {**EXAMPLES[r.BatchGetReplicaListReply][0], "addr": [64.0]},
            ("BatchGetReplicaList", "addr"),
        ),
        (
            r.BatchPutStartReply,
            {**EXAMPLES[r.BatchPutStartReply][0], "n": [1, 0]},
            ("BatchPutStart", "n"),
        ),
        (r.BatchRemoveReply, [[0]], ("BatchRemove", "results[0]")),
        (r.FetchTasksReply, [{"id": [1, 2]}], ("FetchTasks", "tasks[0].type")),
        (r.QueryTaskReply, {**EXAMPLES[r.QueryTaskReply][0], "id": [1]}, ("QueryTask", "id")),
    ],
)
def test_errors_name_method_and_field(
    cls: type[r.Reply], value: Any, names: tuple[str, ...]
) -> None:
    with pytest.raises(r.InvalidReply) as info:
        cls.decode(value)
    assert isinstance(info.value, MalformedMessage)
    for name in names:
        assert name in str(info.value)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)


def _mutations(cls: type[r.Reply]) -> st.SearchStrategy[Any]:
    """Examples with one field swapped for an arbitrary value (near misses)."""
    value = EXAMPLES[cls][0]
    if isinstance(value, dict) and value:
        return st.tuples(st.sampled_from(sorted(value)), _json).map(
            lambda kv: {**value, kv[0]: kv[1]}
        )
    if isinstance(value, list) and value:
        return st.tuples(st.integers(0, len(value) - 1), _json).map(
            lambda iv: [iv[1] if i == iv[0] else v for i, v in enumerate(value)]
        )
    return _json


def _check(cls: type[r.Reply], value: Any) -> None:
    try:
        x = cls.decode(value)
    except r.InvalidReply as exc:
        assert cls.METHOD.value in str(exc)
        return
    assert cls.decode(x.to_wire()) == x  # whatever decodes is a valid reply


@pytest.mark.parametrize("cls", REPLY_CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_arbitrary_json_never_crashes_decode(cls: type[r.Reply], data: st.DataObject) -> None:
    _check(cls, data.draw(_json))
    _check(cls, data.draw(_mutations(cls)))


def test_the_masters_own_replies_decode_to_themselves() -> None:
    """Every reply the real handlers build survives the wire (JSON text and back)
    and the client's decode unchanged."""
    import random

    from pymooncake.store import MasterConfig
    from pymooncake.store._types import SegmentInfo
    from pymooncake.store.master._handlers import build_handlers
    from pymooncake.store.master._offload import wrap_handlers
    from pymooncake.store.master._state import MasterState

    st = MasterState(MasterConfig(), rng=random.Random(1))
    h = wrap_handlers(st, build_handlers(st))
    seg = SegmentInfo(id="s1", name="hostA:1", base=1 << 40, size=64 << 20, host_id="hostA")
    seg2 = SegmentInfo(id="s2", name="hostB:1", base=1 << 41, size=64 << 20, host_id="hostB")
    params = msg.ReplicateParams()
    keys = ("a", "b", "c")

    def _at(key: str) -> str:
        seg = st.objects[key].seg
        assert seg is not None
        return seg.name

    reqs: list[msg.Request | Callable[[], msg.Request]] = [
        msg.ServiceReady(),
        msg.MountSegment("c1", seg.to_params()),
        msg.MountSegment("c2", seg2.to_params()),
        msg.Ping("c1"),
        msg.PutStart("c1", "k", 4096, params),
        msg.PutEnd("c1", "k"),
        msg.PutStart("c1", "k", 4096, params),  # exists: an error, skipped
        msg.BatchPutStart("c1", keys, (64, 64, 64), params),
        msg.BatchPutEnd("c1", keys[:2]),
        msg.BatchPutRevoke("c1", keys[2:]),
        msg.GetReplicaList("k"),
        msg.BatchGetReplicaList(("a", "missing", "k")),
        msg.ExistKey("a"),
        msg.BatchExistKey(("a", "missing")),
        msg.UpsertStart("c1", "k", 128, params),
        msg.UpsertEnd("c1", "k"),
        msg.BatchUpsertStart("c1", ("a", "u"), (32, 32), params),
        msg.BatchUpsertEnd("c1", ("a", "u")),
        msg.CreateCopyTask("k", ("hostB:1",), "c1"),
        msg.FetchTasks("c1", 4),
        # from wherever "a" landed (random placement) to the other segment
        lambda: msg.CopyStart("c1", "a", _at("a"), tuple({"hostA:1", "hostB:1"} - {_at("a")})),
        msg.CopyRevoke("c1", "a"),
        msg.Remove("u", False, "c1"),
        msg.BatchRemove(("b", "missing"), False, "c1"),
        msg.BatchReplicaClear("c1", ("a",), ""),
        msg.GetSummary(),
        msg.UnmountSegment("c2", "s2"),
    ]
    seen: set[type[r.Reply]] = set()
    from pymooncake.errors import StoreError

    for now, made in enumerate(reqs, start=1):
        req = made if isinstance(made, msg.Request) else made()
        try:
            reply = h[type(req)](req, float(now))
        except StoreError:
            continue
        assert isinstance(reply, type(req).REPLY), req
        text = encode_json(reply.to_wire())
        assert type(reply).decode(json.loads(text)) == reply, req
        assert encode_json(type(reply).decode(json.loads(text)).to_wire()) == text
        seen.add(type(reply))
    assert len(seen) == 25, sorted(c.__name__ for c in seen)  # the requests above that succeed


def test_uniform_columns_travel_as_one_integer() -> None:
    """A batch of new keys in one segment: codes, counts, segment indices and
    sizes are one integer each on the wire, adjacent addresses one run, and the
    decoded columns are the lists the client always had."""
    cols = ReplicaColumns(
        [0] * 4,
        {},
        [["127.0.0.1:17001", "seg-a", 1, 0]],
        [1] * 4,
        [0] * 4,
        [64, 128, 192, 256],
        [4096] * 4,
        5000,
    )
    wire = r.BatchGetReplicaListReply(cols).to_wire()
    assert wire == {
        "k": 4, "code": 0, "msg": [], "segs": [["127.0.0.1:17001", "seg-a", 1, 0]],
        "n": 1, "seg": 0, "addr_runs": [[64, 64, 4]], "size": 4096, "lease_ttl_ms": 5000,
    }  # fmt: skip
    decoded = r.BatchGetReplicaListReply.decode(json.loads(encode_json(wire))).columns
    assert decoded == cols and decoded.addr == [64, 128, 192, 256]


@pytest.mark.parametrize(
    ("addr", "runs"),
    [
        ([64, 128, 192], None),  # too short to look at
        ([64, 128, 192, 300], None),  # the last one is off the run
        ([64, 128, 200, 256], None),  # one in the middle is
        ([256, 192, 128, 64], None),  # descending
        ([64, 64, 64, 64], None),  # no stride
        ([0, 4096, 8192, 12288, 16384], [[0, 4096, 5]]),
    ],
)
def test_an_address_column_travels_as_a_run_only_when_it_is_one(
    addr: list[int], runs: list[list[int]] | None
) -> None:
    n = len(addr)
    cols = ReplicaColumns([0] * n, {}, [["h:1", "seg-a", 1, 0]], [1] * n, [0] * n, addr, None, 0)
    wire = r.BatchPutStartReply(cols).to_wire()
    assert wire.get("addr_runs") == runs and wire.get("addr") == (addr if runs is None else None)
    assert r.BatchPutStartReply.decode(json.loads(encode_json(wire))).columns.addr == addr


def test_runs_the_master_built_travel_as_built() -> None:
    """A reservation held as a run in two segments: its columns name the runs
    (``run_columns``); they travel as they are and decode to every address."""
    addr = [
        *range(1 << 30, (1 << 30) + 3 * 4096, 4096),
        *range(1 << 34, (1 << 34) + 2 * 4096, 4096),
    ]
    cols = ReplicaColumns(
        [0] * 5, {}, [["h:1", "a", 1, 1 << 30], ["h:2", "b", 2, 1 << 34]], [1] * 5,
        [0, 0, 0, 1, 1], addr, None, 0, [[1 << 30, 4096, 3], [1 << 34, 4096, 2]],
    )  # fmt: skip
    reply = r.ReserveSlotsReply(cols, 10.0)
    text = encode_json(reply.to_wire())
    assert '"addr_runs":[[1073741824,4096,3],[17179869184,4096,2]]' in text
    back = r.ReserveSlotsReply.decode(json.loads(text))
    assert back == reply and back.columns.addr == addr
    assert encode_json(back.to_wire()) == text


@pytest.mark.parametrize(
    "runs",
    [
        [[64, 64, 3]],  # 3 addresses for 4 replicas
        [[64, 64, 5]],
        [[64, 0, 4]],  # no stride
        [[-64, 64, 4]],
        [[64, 64, 0], [64, 64, 4]],  # an empty run
        [[64, 64]],
        [[64, 64.0, 4]],
        [[64, True, 4]],
        [64, 64, 4],
        {"first": 64},
    ],
)
def test_address_runs_are_checked(runs: Any) -> None:
    value = {"k": 4, "code": 0, "msg": [], "segs": [["h:1", "s", 1, 0]], "n": 1, "seg": 0,
             "addr_runs": runs}  # fmt: skip
    with pytest.raises(r.InvalidReply) as info:
        r.BatchPutStartReply.decode(value)
    assert "BatchPutStart" in str(info.value) and "addr_runs" in str(info.value)


def test_a_reply_without_addresses_is_refused() -> None:
    value = {"k": 1, "code": 0, "msg": [], "segs": [["h:1", "s", 1, 0]], "n": 1, "seg": 0}
    with pytest.raises(r.InvalidReply, match="addr is missing"):
        r.BatchPutStartReply.decode(value)
    ended = r.BatchPutEndReply((0,) * 1000, (None,) * 1000)
    assert ended.to_wire() == 1000
    assert r.BatchPutEndReply.decode(1000) == ended


def test_the_earlier_list_forms_still_decode() -> None:
    """The list forms stay valid for every column (a column that is not uniform
    is one): a reply with every column a list, without "k", and
    ``[[0, null], ...]`` for a batch that succeeded decode to the same values
    as their compact forms."""
    old = {
        "code": [0, 0], "msg": [], "segs": [["127.0.0.1:17001", "seg-a", 1, 0]],
        "n": [1, 1], "seg": [0, 0], "addr": [64, 128], "size": [8, 8], "lease_ttl_ms": 5000,
    }  # fmt: skip
    new = r.BatchGetReplicaListReply.decode(old).to_wire()
    assert new["code"] == 0 and new["n"] == 1 and new["size"] == 8 and new["k"] == 2
    assert r.BatchGetReplicaListReply.decode(new) == r.BatchGetReplicaListReply.decode(old)
    assert r.BatchPutEndReply.decode([[0, None]] * 3) == r.BatchPutEndReply.decode(3)


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"code": 0, "msg": [], "segs": [], "n": 1, "seg": [], "addr": []}, "code"),
        ({"k": -1, "code": 0, "msg": [], "segs": [], "n": 1, "seg": 0, "addr": []}, "k"),
        ({"k": 10**9, "code": 0, "msg": [], "segs": [], "n": 1, "seg": 0, "addr": []}, "k"),
        ({"k": 2, "code": 0, "msg": [], "segs": [], "n": 1, "seg": 0, "addr": [1]}, "addr"),
        ({"k": 1, "code": 0, "msg": [], "segs": [], "n": 10**9, "seg": 0, "addr": []}, "seg"),
    ],
)
def test_uniform_columns_are_checked(value: dict[str, Any], field: str) -> None:
    with pytest.raises(r.InvalidReply) as info:
        r.BatchPutStartReply.decode(value)
    assert "BatchPutStart" in str(info.value) and field in str(info.value)


@pytest.mark.parametrize("value", [-1, 10**9, True])
def test_a_count_of_successes_is_checked(value: Any) -> None:
    with pytest.raises(r.InvalidReply) as info:
        r.BatchPutEndReply.decode(value)
    assert "BatchPutEnd" in str(info.value) and "results" in str(info.value)
