"""Several ejabberd nodes of one private stack joined into one Erlang cluster on loopback.

Node n listens for Erlang distribution on 127.0.0.n, every node on the same port
(``ERL_DIST_PORT``, no epmd: that is how a node finds its peers' port), so nothing of the
cluster is reachable from outside the host. The cookie is the stack directory's
``.erlang.cookie`` (0600), found as ``$HOME/.erlang.cookie`` by every node and by
ejabberdctl; it never appears in a command line. All nodes share the stack's MariaDB (accounts,
PEP, offline queue, archive, rooms); Mnesia holds only what the cluster replicates while it runs
(sessions, routes, online rooms), so every start wipes the nodes' spools and joins them afresh
with ``ejabberdctl join_cluster``: no node waits for a peer that was stopped later than itself.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

from capsule_stack.mariadb import MariaDB
from capsule_stack.processes import StackError, free_port, terminate
from capsule_stack.servers import Ejabberd, XMPPServer
from capsule_stack.stack import Stack
from capsule_stack.state import DEFAULT_DOMAIN, StackState

MAX_NODES = 9  # node n listens on 127.0.0.n


def _address(index: int) -> str:
    return f"127.0.0.{index}"


class ClusterNode(Ejabberd):
    """Node ``index`` (1-based) of the cluster: its own directory, ports and loopback address."""

    def __init__(self, state: StackState, index: int):
        super().__init__(state)
        self.index = index
        if index > 1:
            self.dir = Path(state.dir) / f"ejabberd{index}"
            ports = state.extra_nodes[index - 2]
            self.c2s_port, self.http_port = ports["c2s_port"], ports["http_port"]
            self.pid_key = f"server{index}"

    @property
    def marker(self) -> str:
        return f"{self.dir}/"  # ".../ejabberd" alone would also match ".../ejabberd2"

    @property
    def home(self) -> Path:
        return Path(self.state.dir)

    @property
    def erlang_node(self) -> str:
        return f"capsule{self.index}@{_address(self.index)}"

    def node(self) -> dict[str, str | int]:
        return {"node": self.erlang_node, "dist_port": self.state.dist_port,
                "interface": "{" + _address(self.index).replace(".", ",") + "}"}

    def start(self) -> int:
        shutil.rmtree(self.dir / "spool", ignore_errors=True)
        (self.dir / "spool").mkdir()
        return super().start()

    def ctl(self, *args: str) -> str:
        return self._ctl(*args)


def _free_on_every_address(count: int) -> int:
    """A port free on 127.0.0.1 (where free_port finds it) and on the other nodes' addresses."""
    for _ in range(20):
        port = free_port()
        try:
            for index in range(2, count + 1):
                with socket.socket() as s:
                    s.bind((_address(index), port))
        except OSError:
            continue
        return port
    raise StackError("found no port free on every node's loopback address")


class ClusterStack(Stack):
    """A stack whose server is ``nodes`` ejabberd nodes in one cluster (node 1 as in Stack)."""

    def __init__(self, directory: str | os.PathLike[str], domain: str = DEFAULT_DOMAIN,
                 ca_dir: str | os.PathLike[str] | None = None, nodes: int = 2):
        super().__init__(directory, "ejabberd", domain, ca_dir)
        self.nodes = nodes

    def cluster_nodes(self) -> list[ClusterNode]:
        return [ClusterNode(self.info, index) for index in range(1, self.nodes + 1)]

    def _parts(self) -> tuple[MariaDB, XMPPServer]:
        return MariaDB(self.info), ClusterNode(self.info, 1)

    def _markers(self) -> dict[str, str]:
        return {**super()._markers(), **{n.pid_key: n.marker for n in self.cluster_nodes()}}

    def _new_state(self) -> StackState:
        state = super()._new_state()
        state.extra_nodes = [{"c2s_port": free_port(), "http_port": free_port()}
                             for _ in range(self.nodes - 1)]
        state.dist_port = _free_on_every_address(self.nodes)
        return state

    def _ports(self) -> list[tuple[str, str, int]]:
        extra = [(f"node {index} {what.split('_')[0]}", "127.0.0.1", port)
                 for index, node in enumerate(self.info.extra_nodes, 2)
                 for what, port in node.items()]
        dist = [("Erlang distribution", _address(index), self.info.dist_port)
                for index in range(1, self.nodes + 1)]
        return [*super()._ports(), *extra, *dist]

    def start(self) -> StackState:
        """Start MariaDB and node 1 (as Stack does), then every other node, each joined to
        node 1 and proved by a real login on its own port."""
        state = super().start()  # a running cluster whose node 1 serves is left as it is
        alive = self.running()
        if len(alive) == len(self._markers()) and all(alive.values()):
            return state
        try:
            self._join_nodes()
        except BaseException:
            self._end_processes()
            raise
        return state

    def _join_nodes(self) -> None:
        first, *others = self.cluster_nodes()
        db = MariaDB(self.info)
        for node in others:
            node.configure(db, self._server_files())
            self._start_server(node)
            node.ctl("join_cluster", first.erlang_node)
            # joining restarts ejabberd on the node: wait until it serves again
            self.probe(port=node.c2s_port, timeout=60)
        members = self.members()
        missing = {n.erlang_node for n in self.cluster_nodes()} - set(members)
        if missing:
            raise StackError(f"nodes {sorted(missing)} did not join the cluster "
                             f"(log: {others[-1].log})")

    def members(self) -> list[str]:
        """The cluster's nodes, as the first running node that answers lists them (whether
        MariaDB runs does not matter: the cluster is Erlang's); StackError if none answers."""
        running = self.running()
        failure = StackError(f"no node of the cluster in {self.dir} is running")
        for node in self.cluster_nodes():
            if running.get(node.pid_key):
                try:
                    return [name.strip("'") for name in node.ctl("list_cluster").split()]
                except StackError as exc:
                    failure = exc
        raise failure

    def _end_processes(self) -> None:
        if self.state is not None:
            for node in reversed(self.cluster_nodes()[1:]):
                self._terminate(node.pid_key, node.marker)
        super()._end_processes()

    def _terminate(self, key: str, marker: str) -> None:
        pid = self.info.pids.pop(key, None)
        if pid:
            terminate(pid, marker)
        self._save_state()

    def restart_server(self) -> None:
        """Restart every node and join them afresh (data stay; the spools are the nodes' own);
        a live MariaDB keeps running, a dead one is started again."""
        if not self.info.pids:
            raise StackError(f"the stack in {self.dir} is stopped; use `start`")
        for node in reversed(self.cluster_nodes()[1:]):
            self._terminate(node.pid_key, node.marker)
        try:
            super().restart_server()  # node 1, its spool wiped by ClusterNode.start
            self._join_nodes()
        except BaseException:
            self._end_processes()
            raise

    def kill_node(self, index: int) -> None:
        """SIGKILL node ``index`` (a crash: no goodbye to its clients or its peers)."""
        self.kill_server(self.cluster_nodes()[index - 1])


def open_stack(directory: str | os.PathLike[str], server: str = "ejabberd",
               domain: str = DEFAULT_DOMAIN, ca_dir: str | os.PathLike[str] | None = None,
               nodes: int | None = None) -> Stack:
    """The stack in ``directory``: a cluster when ``nodes`` > 1 or when it was started as one."""
    try:
        recorded: int | None = 1 + len(
            json.loads((Path(directory) / "stack.json").read_text()).get("extra_nodes", []))
    except (OSError, ValueError):
        recorded = None  # no stack yet (or an unreadable state, which Stack reports)
    if nodes is not None and recorded is not None and nodes != recorded:
        raise StackError(f"the stack in {directory} has {recorded} node(s), not {nodes}; "
                         f"start a fresh stack with another --dir")
    nodes = nodes or recorded or 1
    if nodes == 1:
        return Stack(directory, server, domain, ca_dir)
    if server != "ejabberd":
        raise StackError(f"--nodes {nodes}: only ejabberd runs as a cluster here ({server} has "
                         f"no clustering)")
    return ClusterStack(directory, domain, ca_dir, nodes)
