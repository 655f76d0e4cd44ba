"""The private internals of pysyncobj, betterproto2 and redis-py that our code relies on are
still there (redis-py: the probe's RESP2 parser, sources/probers.py; capped redis<9; py-consul:
the client's `token` and raw `http.get`, sources/consul.py; capped py-consul<2).

pyproject.toml caps both packages (pysyncobj<0.3.18, betterproto2<0.10) because raft/store.py,
raft/conf.py and xds/encoding.py reach into them. Several of those uses fail silently when the
internal moves: SyncObjConf ignores keywords it does not know, the store falls back to slow
commits without the pipe notifier, and encoding.install() skips its patch when `_validate` is
gone. Whoever raises a cap must see exactly what broke: every failure here names the package,
its installed version, the missing or changed internal, and the code that uses it.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

try:  # an upgrade that moves an import we rely on must fail as loudly as the checks below
    import betterproto2
    import pydantic
    import pysyncobj.journal
    import pysyncobj.serializer
    import pysyncobj.syncobj
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster
    from envoy_data_plane.message_pool import default_message_pool
    from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer
    from pysyncobj.node import Node, TCPNode
    from pysyncobj.tcp_connection import TcpConnection
    from pysyncobj.transport import TCPTransport, Transport

    from repstage_mesh.core.models import CommandEnvelope, Noop
    from repstage_mesh.raft import conf as raft_conf
    from repstage_mesh.raft import durable as raft_durable
    from repstage_mesh.raft import store as raft_store
    from repstage_mesh.raft.conf import RaftTimings, build_conf
    from repstage_mesh.raft.store import ReplicatedStore
    from repstage_mesh.xds import cache as _cache  # noqa: F401  (importing it installs the patch)
    from repstage_mesh.xds import encoding
except ImportError as exc:
    pytest.fail(
        f"pysyncobj {version('pysyncobj')}, betterproto2 {version('betterproto2')}: an import "
        f"that our code or this test relies on is gone: {exc}",
        pytrace=False,
    )

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Internal:
    package: str  # the distribution, as pinned in pyproject.toml
    name: str  # the internal, as our code spells it
    used_by: str  # where, and what breaks without it
    check: Callable[[ReplicatedStore], None]  # raises AttributeError / AssertionError / TypeError

    @property
    def needs_store(self) -> bool:
        return "store" in inspect.signature(self.check).parameters


def fail_loudly(internal: Internal, problem: str) -> None:
    pytest.fail(
        f"{internal.package} {version(internal.package)}: {internal.name} {problem}\n"
        f"    relied on by {internal.used_by}.\n"
        f"    Raising the upper bound on {internal.package} in pyproject.toml needs this fixed first.",
        pytrace=False,
    )


def need(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


def code_names(function: object) -> set[str]:
    """The attribute and global names a function's bytecode uses (private names appear mangled,
    exactly as our code spells them, e.g. `_SyncObj__mainThread`)."""
    return set(function.__code__.co_names)  # type: ignore[attr-defined]


# --- pysyncobj ----------------------------------------------------------------------------------


def _raft_states(_: ReplicatedStore) -> None:
    states = pysyncobj.syncobj._RAFT_STATE
    need((states.FOLLOWER, states.CANDIDATE, states.LEADER) == (0, 1, 2),
         f"has other values: {vars(states)}")


def _set_state_calls_on_state_changed(_: ReplicatedStore) -> None:
    set_state = SyncObj._SyncObj__setState
    need({"onStateChanged", "_SyncObj__raftState"} <= code_names(set_state),
         "no longer calls conf.onStateChanged(old, new) when it changes _SyncObj__raftState")
    need(list(inspect.signature(set_state).parameters) == ["self", "newState"],
         f"has another signature: {inspect.signature(set_state)}")


def _is_leader(_: ReplicatedStore) -> None:
    need("_SyncObj__raftState" in code_names(SyncObj._isLeader),
         "no longer reads _SyncObj__raftState")


def _get_leader(_: ReplicatedStore) -> None:
    need("_SyncObj__raftLeader" in code_names(SyncObj._getLeader),
         "no longer returns _SyncObj__raftLeader")


def _raft_log(store: ReplicatedStore) -> None:
    journal = store._sync._SyncObj__raftLog
    entry = journal[-1]
    need(len(journal) >= 1 and len(entry) == 3, f"entries are not (data, index, term): {entry!r}")
    need(entry[1] == store._sync.raftCommitIndex >= 1, f"entry[1] is not the log index: {entry!r}")
    need(entry[2] == store._sync.raftCurrentTerm, f"entry[2] is not the term: {entry!r}")


def _pipe_notifier(store: ReplicatedStore) -> None:
    notifier = store._sync._SyncObj__pipeNotifier
    need(callable(notifier.notify), "has no notify()")


def _main_thread(store: ReplicatedStore) -> None:
    need(store._sync._SyncObj__mainThread is threading.main_thread(), "is not the thread we pinned")
    need({"_SyncObj__mainThread", "is_alive"} <= code_names(SyncObj._autoTickThread),
         "is no longer what the tick thread checks (is_alive) to decide when to stop")


def _conf_keywords(_: ReplicatedStore) -> None:
    # SyncObjConf(**kwargs) reads kwargs.get(name, default): a renamed option is silently ignored.
    tree = ast.parse(inspect.getsource(raft_conf))
    calls = [n for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "SyncObjConf"]
    need(len(calls) == 1, f"raft/conf.py: expected one SyncObjConf(...) call, found {len(calls)}")
    passed = {k.arg for k in calls[0].keywords if k.arg is not None}
    known = set(vars(SyncObjConf()))
    need(passed <= known, f"does not know {sorted(passed - known)}")

    def on_state_changed(old: int, new: int) -> None: ...

    timings = RaftTimings(append_entries_period=0.04, leader_fallback_timeout=1.25)
    with tempfile.TemporaryDirectory() as data_dir:
        conf = build_conf(Path(data_dir), None, timings, on_state_changed)
    need(conf.onStateChanged is on_state_changed, "onStateChanged is not kept")
    need(conf.appendEntriesPeriod == 0.04 and conf.leaderFallbackTimeout == 1.25, "values are not kept")
    conf.validate()


def _sync_obj_constructor(_: ReplicatedStore) -> None:
    params = inspect.signature(SyncObj.__init__).parameters
    missing = {"selfNode", "otherNodes", "conf", "consumers", "nodeClass", "transportClass"} - set(params)
    need(not missing, f"has no parameters {sorted(missing)}")


def _sync_obj_api(store: ReplicatedStore) -> None:
    sync = store._sync
    for method in ("waitBinded", "destroy_synchronous", "addOnTickCallback", "removeOnTickCallback",
                   "isNodeConnected"):
        need(callable(getattr(sync, method)), f"SyncObj.{method} is gone")
    for prop in ("hasQuorum", "raftLastApplied", "raftCommitIndex", "raftCurrentTerm", "selfNode"):
        need(isinstance(inspect.getattr_static(SyncObj, prop), property), f"SyncObj.{prop} is not a property")


def _consumer(store: ReplicatedStore) -> None:
    need(store._applier._syncObj is store._sync, "SyncObjConsumer._syncObj is not the SyncObj")
    for hook in ("_serialize", "_deserialize"):
        need(callable(getattr(SyncObjConsumer, hook, None)), f"SyncObjConsumer.{hook} is gone")
    # _Applier numbers the entry it applies raftLastApplied + 1: pysyncobj must count it after
    journal = store._sync._SyncObj__raftLog
    need(store.state.index == store._sync.raftLastApplied == journal[-1][1] >= 1,
         f"raftLastApplied is not counted after the consumer applies an entry: state index "
         f"{store.state.index}, raftLastApplied {store._sync.raftLastApplied}, last entry {journal[-1][1]}")


def _fail_reasons(_: ReplicatedStore) -> None:
    names = ("SUCCESS", "QUEUE_FULL", "MISSING_LEADER", "DISCARDED", "NOT_LEADER", "LEADER_CHANGED",
             "UNKNOWN_OUTCOME")
    missing = [n for n in names if not hasattr(FAIL_REASON, n)]
    need(not missing, f"has no {missing}")


def _transport(_: ReplicatedStore) -> None:
    params = list(inspect.signature(Transport.__init__).parameters)
    need(params == ["self", "syncObj", "selfNode", "otherNodes"], f"Transport.__init__{params}")
    abstract = [name for name, member in vars(Transport).items()
                if callable(member) and "NotImplementedError" in inspect.getsource(member)]
    local = raft_store._LocalTransport
    need(abstract == ["send"], f"Transport's abstract methods are now {abstract}")
    need(all(name in vars(local) for name in abstract), "_LocalTransport does not implement them all")
    transport = local(None, Node("local:pin"), set())
    need(transport.ready is True, "Transport.ready is not True without a network")
    transport.tryGetReady()  # neither may raise for a transport with nothing to bind
    transport.waitReady()


def _node(_: ReplicatedStore) -> None:
    plain, tcp = Node("127.0.0.1:7000"), TCPNode("127.0.0.1:7000")
    need(plain.id == "127.0.0.1:7000", "Node.id is not the id it was given")
    need(plain == tcp and hash(plain) == hash(tcp), "a Node no longer equals the TCPNode of the same id")


PYSYNCOBJ = "pysyncobj"
STORE = "repstage_mesh/raft/store.py"
INTERNALS = [
    Internal(PYSYNCOBJ, "pysyncobj.syncobj._RAFT_STATE (FOLLOWER=0, CANDIDATE=1, LEADER=2)",
             f"{STORE} leadership_change (on_role_change)", _raft_states),
    Internal(PYSYNCOBJ, "SyncObj._SyncObj__setState -> conf.onStateChanged(old, new)",
             f"{STORE} on_role_change (the only source of leadership events)", _set_state_calls_on_state_changed),
    Internal(PYSYNCOBJ, "SyncObj._isLeader", f"{STORE} is_leader, confirm_leadership", _is_leader),
    Internal(PYSYNCOBJ, "SyncObj._getLeader", f"{STORE} leader, submit, status", _get_leader),
    Internal(PYSYNCOBJ, "SyncObj._SyncObj__raftLog", f"{STORE} _wake_if_uncommitted (single-node commit latency)",
             _raft_log),
    Internal(PYSYNCOBJ, "SyncObj._SyncObj__pipeNotifier",
             f"{STORE} _wake_if_uncommitted (without it a lone node commits once per 50 ms tick)", _pipe_notifier),
    Internal(PYSYNCOBJ, "SyncObj._SyncObj__mainThread",
             f"{STORE} _start (a store built on a worker thread would stop ticking when it exits)", _main_thread),
    Internal(PYSYNCOBJ, "SyncObjConf keywords passed by build_conf",
             "repstage_mesh/raft/conf.py build_conf (unknown keywords are silently ignored)", _conf_keywords),
    Internal(PYSYNCOBJ, "SyncObj(selfNode, otherNodes, conf=, consumers=, nodeClass=, transportClass=)",
             f"{STORE} _start", _sync_obj_constructor),
    Internal(PYSYNCOBJ, "SyncObj methods and properties the store calls", STORE, _sync_obj_api),
    Internal(PYSYNCOBJ, "SyncObjConsumer._syncObj, _serialize, _deserialize",
             f"{STORE} _Applier (the Raft index of an entry, snapshots)", _consumer),
    Internal(PYSYNCOBJ, "FAIL_REASON members", f"{STORE} submit (what a failed write means)", _fail_reasons),
    Internal(PYSYNCOBJ, "pysyncobj.transport.Transport", f"{STORE} _LocalTransport (single node)", _transport),
    Internal(PYSYNCOBJ, "pysyncobj.node.Node (id, equality with TCPNode)",
             f"{STORE} single-node selfNode and _peer_keys (isNodeConnected)", _node),
]


# --- betterproto2 -------------------------------------------------------------------------------


def _message_method(name: str) -> ast.FunctionDef:
    """`betterproto2.Message.<name>` as betterproto2's source defines it (not as patched)."""
    tree = ast.parse(inspect.getsource(inspect.getmodule(betterproto2.Message)))  # type: ignore[arg-type]
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "Message":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    raise AttributeError(f"betterproto2.Message defines no {name}")


def _names_in(function: ast.FunctionDef) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
    return found


def _validate_exists(_: ReplicatedStore) -> None:
    original = _message_method("_validate")
    need(list(inspect.signature(betterproto2.Message._validate).parameters) == ["self"],
         "takes arguments now")
    # xds/encoding.py's replacement does exactly this, with the validator cached per class
    expected = {"_is_pydantic", "__pydantic_core_schema__", "SchemaValidator", "validate_python",
                "_unknown_fields"}
    need(expected <= _names_in(original),
         f"no longer validates like xds/encoding.py's copy (missing {sorted(expected - _names_in(original))})")
    need(betterproto2.Message._validate is encoding._validate, "was not replaced by encoding.install()")


def _bytes_calls_validate(_: ReplicatedStore) -> None:
    need({"_is_pydantic", "_validate"} <= code_names(betterproto2.Message.__bytes__),
         "Message.__bytes__ no longer calls self._validate() (the patch would save nothing)")
    encoding._VALIDATORS.pop(Cluster, None)
    bytes(Cluster(name="pin"))
    need(Cluster in encoding._VALIDATORS, "bytes(message) did not go through the patched _validate")
    broken = Cluster(name="pin")
    broken.name = 5  # type: ignore[assignment]
    with pytest.raises(pydantic.ValidationError):
        bytes(broken)


def _field_default_is_only_compared(_: ReplicatedStore) -> None:
    original = _message_method("_get_field_default")
    need([a.arg for a in original.args.args] == ["self", "field_name"], "takes other arguments now")
    need({"default_gen", "catch_warnings"} <= _names_in(original),
         "no longer builds the default from default_gen inside catch_warnings (what the cache skips)")
    # the cache hands out one shared default per field: fine only while betterproto2 compares it
    tree = ast.parse(inspect.getsource(inspect.getmodule(betterproto2.Message)))  # type: ignore[arg-type]
    callers = {fn.name for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
               and fn.name != "_get_field_default" and "_get_field_default" in _names_in(fn)}
    need(callers <= {"__bytes__", "__bool__", "__repr__", "is_set"},
         f"is used by {sorted(callers)} now, which may keep or change the default it returns")
    need(betterproto2.Message._get_field_default is encoding._get_field_default,
         "was not replaced by encoding.install()")
    need(bytes(Cluster(name="pin")) == bytes(Cluster(name="pin")) and not bool(Cluster()),
         "defaults are not left out of the encoding any more")


def _is_pydantic(_: ReplicatedStore) -> None:
    need(callable(getattr(betterproto2.Message, "_is_pydantic", None)), "is gone")
    need(Cluster(name="pin")._is_pydantic() is True, "is False for envoy-data-plane messages")


def _core_schema(_: ReplicatedStore) -> None:
    need(getattr(Cluster, "__pydantic_core_schema__", None) is not None,
         "is missing on envoy-data-plane message classes")


def _unknown_fields(_: ReplicatedStore) -> None:
    extra = set(vars(Cluster(name="pin"))) - set(Cluster.__dataclass_fields__)
    need(extra == {"_unknown_fields"}, f"instances hold other non-field attributes: {sorted(extra)}")


def _type_to_url(_: ReplicatedStore) -> None:
    need(default_message_pool.type_to_url[Cluster] == "type.googleapis.com/envoy.config.cluster.v3.Cluster",
         "does not map message classes to type URLs")


BETTERPROTO2 = "betterproto2"
ENCODING = "xds/encoding.py"
INTERNALS += [
    Internal(BETTERPROTO2, "betterproto2.Message._validate", f"{ENCODING} (replaced by install())",
             _validate_exists),
    Internal(BETTERPROTO2, "betterproto2.Message.__bytes__ -> self._validate()", f"{ENCODING} (what the patch speeds up)",
             _bytes_calls_validate),
    Internal(BETTERPROTO2, "betterproto2.Message._get_field_default (compared only)",
             f"{ENCODING} _get_field_default (the default cached per class and field)", _field_default_is_only_compared),
    Internal(BETTERPROTO2, "betterproto2.Message._is_pydantic", f"{ENCODING} _validate", _is_pydantic),
    Internal(BETTERPROTO2, "<message class>.__pydantic_core_schema__", f"{ENCODING} _validate", _core_schema),
    Internal(BETTERPROTO2, "Message instance __dict__ == fields + _unknown_fields",
             f"{ENCODING} _validate (validates __dict__ minus _unknown_fields)", _unknown_fields),
    Internal(BETTERPROTO2, "MessagePool.type_to_url", "filters/type_urls.py type_url_of", _type_to_url),
]


def _create_journal(store: ReplicatedStore) -> None:
    need("createJournal" in code_names(SyncObj.__init__),
         "SyncObj.__init__ no longer builds its journal with the module-level createJournal")
    need(pysyncobj.syncobj.createJournal is raft_durable._create_journal, "was not replaced by durable.install()")
    need(isinstance(store._sync._SyncObj__raftLog, raft_durable.DurableJournal),
         "the store's journal is not a DurableJournal")


def _file_journal(_: ReplicatedStore) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        journal = raft_durable.DurableJournal(str(Path(data_dir) / "j"), raft_durable.JournalOptions())
        try:
            need(isinstance(journal._FileJournal__journal, list), "_FileJournal__journal is not the entry list")
            need(callable(journal._FileJournal__journalFile.flush), "ResizableFile.flush (msync) is gone")
            need(isinstance(journal._FileJournal__meta, dict), "_FileJournal__meta is not a dict")
            journal.add(b"x", 1, 1)
            need(journal._dirty, "add() did not go through DurableJournal.add")
            need(journal[0] == (b"x", 1, 1) and journal.durable_index == 1, "a read did not sync")
            journal.setCurrentTerm(3, "peer")
            need(journal.meta_storer.durable_meta.get("currentTerm") == 3,
                 "setCurrentTerm no longer stores term and vote through _FileJournal__metaStorer.storeMeta")
        finally:
            journal._destroy()
    for name in ("add", "clear", "deleteEntriesFrom", "deleteEntriesTo", "__getitem__", "__len__",
                 "setCurrentTerm", "flush"):
        need(name in vars(pysyncobj.journal.FileJournal), f"FileJournal.{name} is gone")


def _dump_before_clear(_: ReplicatedStore) -> None:
    need("clear" in code_names(pysyncobj.journal.FileJournal.deleteEntriesTo),
         "FileJournal.deleteEntriesTo (log compaction) no longer goes through clear()")
    need("clear" in code_names(SyncObj._SyncObj__loadDumpFile),
         "SyncObj.__loadDumpFile (an installed snapshot) no longer clears the journal with clear()")
    need("atomicReplace" in code_names(pysyncobj.serializer.Serializer.serialize),
         "the full dump is no longer written through a rename (atomicReplace)")


def _vote_stored_before_sent(_: ReplicatedStore) -> None:
    source = inspect.getsource(SyncObj._SyncObj__onMessageReceived)
    vote = source.index("'response_vote'")
    need(source.rfind("__setCurrentTerm(self.__raftCurrentTerm, node.id)", 0, vote) != -1,
         "no longer stores the vote (setCurrentTerm) before it sends response_vote")


def _leader_sends_then_counts(_: ReplicatedStore) -> None:
    need(callable(getattr(SyncObj, "_SyncObj__sendAppendEntries", None)), "SyncObj.__sendAppendEntries is gone")
    apply = inspect.getsource(SyncObj._checkCommandsToApply)
    response = apply.find("'apply_command_response'")
    need(response != -1 and apply.find("self.__sendAppendEntries()", response) != -1,
         "_checkCommandsToApply no longer sends the leader's entries right after apply_command_response")
    tick = inspect.getsource(SyncObj._onTick)
    need("__getEntries(commitIdx, 1)" in tick,
         "_onTick no longer reads the entry back (a synced read) before it counts it towards the commit")


def _tcp_connection(_: ReplicatedStore) -> None:
    for name in ("_TcpConnection__processRead", "_TcpConnection__processParseMessage", "disconnect"):
        need(callable(getattr(TcpConnection, name, None)), f"TcpConnection.{name} is gone")
    need("_TcpConnection__processRead" in code_names(TcpConnection._TcpConnection__tryReadBuffer),
         "__tryReadBuffer no longer reads through __processRead")
    need({"_TcpConnection__readBuffer", "recv"} <= code_names(TcpConnection._TcpConnection__processRead),
         "__processRead no longer appends recv() to __readBuffer")
    parse = inspect.getsource(TcpConnection._TcpConnection__processParseMessage)
    need("struct.unpack('i'" in parse, "the frame header is no longer a native 'i' length")
    need({"sendRandKey"} <= code_names(TCPTransport._onIncomingMessageReceived),
         "authentication no longer sets conn.sendRandKey (the guard's 'authenticated' marker)")


def _tcp_transport(_: ReplicatedStore) -> None:
    for name in ("_onNewIncomingConnection", "addNode", "send"):
        need(callable(getattr(TCPTransport, name, None)), f"TCPTransport.{name} is gone")
    need("_connections" in code_names(TCPTransport.addNode), "addNode no longer fills _connections")
    need("_syncObj" in code_names(TCPTransport.__init__), "TCPTransport no longer keeps _syncObj")


DURABLE = "repstage_mesh/raft/durable.py"
GUARD = "repstage_mesh/raft/guard.py"
INTERNALS += [
    Internal(PYSYNCOBJ, "pysyncobj.syncobj.createJournal", f"{DURABLE} install (the durable journal)",
             _create_journal),
    Internal(PYSYNCOBJ, "FileJournal _FileJournal__journal, _FileJournal__journalFile, _FileJournal__meta, "
             "_FileJournal__metaStorer", f"{DURABLE} DurableJournal (msync, fsync'd term and vote)", _file_journal),
    Internal(PYSYNCOBJ, "FileJournal.deleteEntriesTo and SyncObj._SyncObj__loadDumpFile clear the journal after a dump",
             f"{DURABLE} DurableJournal.clear (the dump is fsync'd first)", _dump_before_clear),
    Internal(PYSYNCOBJ, "SyncObj._SyncObj__onMessageReceived stores the vote before response_vote",
             f"{DURABLE} (a vote is on disk before it is granted)", _vote_stored_before_sent),
    Internal(PYSYNCOBJ, "SyncObj._SyncObj__sendAppendEntries follows apply_command_response; _onTick reads "
             "the entry before it commits", f"{DURABLE} DurableSyncObj (the leader's msync overlaps replication)",
             _leader_sends_then_counts),
    Internal(PYSYNCOBJ, "TcpConnection _TcpConnection__processRead, _TcpConnection__readBuffer, sendRandKey",
             f"{GUARD} GuardedConnection (frame limit before authentication)", _tcp_connection),
    Internal(PYSYNCOBJ, "TCPTransport _onNewIncomingConnection, addNode, _connections, _syncObj",
             f"{GUARD} GuardedTCPTransport", _tcp_transport),
]


def _resp2_parser(_: ReplicatedStore) -> None:
    from redis._parsers import _AsyncRESP2Parser

    need(isinstance(getattr(_AsyncRESP2Parser, "EXCEPTION_CLASSES", None), dict),
         "no longer maps error replies through a class-level EXCEPTION_CLASSES table")
    need("parse_error" in dir(_AsyncRESP2Parser), "no longer turns error replies with parse_error")


INTERNALS += [
    Internal("redis", "redis._parsers._AsyncRESP2Parser.EXCEPTION_CLASSES",
             "sources/probers.py _WholeErrorReplies (every error reply a plain answer with its text)",
             _resp2_parser),
]


def _consul_token(_: ReplicatedStore) -> None:
    import consul

    client = consul.Consul(token="from-argument")
    client.token = "configured"
    need(client.prepare_headers() == {"X-Consul-Token": "configured"},
         "prepare_headers() no longer sends the client's `token` attribute")


def _consul_http_get(_: ReplicatedStore) -> None:
    import consul.aio
    import consul.base

    need(consul.base.Response._fields == ("code", "headers", "body"),
         "base.Response is no longer (code, headers, body)")
    params = list(inspect.signature(consul.aio.HTTPClient.get).parameters)
    need(params[:5] == ["self", "callback", "path", "params", "headers"],
         f"aio HTTPClient.get(callback, path, params, headers) changed: {params}")


CONSUL_USES = "sources/consul.py"
INTERNALS += [
    Internal("py-consul", "Consul.token read by prepare_headers()",
             f"{CONSUL_USES} consul_client (the configured token wins over CONSUL_HTTP_TOKEN)",
             _consul_token),
    Internal("py-consul", "Consul.http.get(callback, path, params, headers) -> callback(Response)",
             f"{CONSUL_USES} health_query (reads X-Consul-Results-Filtered-By-ACLs), "
             "sources/consul_registration.py resync (asks with our token)", _consul_http_get),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicatedStore]:
    """A real single-node store that leads and has committed one entry of ours: the name-mangled
    attributes are set in SyncObj.__init__, so only a real instance shows them."""
    solo = None
    problem = None
    try:
        solo = ReplicatedStore("pin", None, [], tmp_path_factory.mktemp("pin") / "solo")
        deadline = time.monotonic() + 5
        while not solo.is_leader():
            if time.monotonic() > deadline:
                raise AssertionError("it did not lead within 5 s")
            time.sleep(0.01)
        asyncio.run(solo.submit(CommandEnvelope(command=Noop(node="pin")), timeout=2))
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    try:
        if problem is not None:
            pytest.fail(f"pysyncobj {version('pysyncobj')}: a single-node ReplicatedStore no longer "
                        f"starts, leads and commits: {problem}", pytrace=False)
        assert solo is not None
        yield solo
    finally:
        if solo is not None:
            solo.close()


@pytest.mark.parametrize("internal", INTERNALS, ids=[f"{i.package}:{i.name}" for i in INTERNALS])
def test_pinned_internal_is_still_there(internal: Internal, request: pytest.FixtureRequest) -> None:
    # None only for the checks that ignore their argument
    store: Any = request.getfixturevalue("store") if internal.needs_store else None
    problem = None
    try:
        internal.check(store)
    except (AttributeError, TypeError, KeyError, IndexError, AssertionError) as exc:
        problem = f"has moved or changed: {type(exc).__name__}: {exc}"
    if problem is not None:
        fail_loudly(internal, problem)


def private_names_used() -> set[str]:
    """The private pysyncobj and betterproto2 names our code spells out."""
    used: set[str] = set()
    store_tree = ast.parse((ROOT / "repstage_mesh" / "raft" / "store.py").read_text())
    for node in ast.walk(store_tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pysyncobj"):
            used.update(alias.name for alias in node.names if alias.name.startswith("_"))
        elif isinstance(node, ast.Attribute) and (
            node.attr.startswith("_SyncObj__") or node.attr == "_syncObj"
            or (isinstance(node.value, ast.Attribute) and node.value.attr == "_sync" and node.attr.startswith("_"))
        ):
            used.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("_SyncObj__"):
            used.add(node.value)  # getattr(sync, "_SyncObj__x", None)
    for module in ("durable.py", "guard.py"):
        tree = ast.parse((ROOT / "repstage_mesh" / "raft" / module).read_text())
        for node in ast.walk(tree):
            name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "name", None)
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                name = node.value
            if (isinstance(name, str) and name.startswith(("_FileJournal__", "_TcpConnection__", "_SyncObj__"))) or (isinstance(name, str) and name in {"_onNewIncomingConnection", "_connections", "_syncObj"}):
                used.add(name)
    encoding_tree = ast.parse((ROOT / "xds" / "encoding.py").read_text())
    for node in ast.walk(encoding_tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and node.attr not in {"_VALIDATORS"}:
            used.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("_"):
            used.add(node.value)
    return used


def test_every_private_name_our_code_uses_is_checked() -> None:
    """A new private pysyncobj or betterproto2 name in store.py or encoding.py needs a check above."""
    used = private_names_used()
    assert {"_SyncObj__raftLog", "_SyncObj__pipeNotifier", "_SyncObj__mainThread", "_isLeader", "_getLeader",
            "_RAFT_STATE", "_syncObj", "_validate", "_is_pydantic", "__pydantic_core_schema__",
            "_unknown_fields"} <= used, f"the scan of our code finds only {sorted(used)}"
    checked = " ".join(i.name for i in INTERNALS)
    unchecked = sorted(name for name in used if name not in checked)
    assert not unchecked, f"private names used by our code but not checked here: {unchecked}"
