"""Capsule over a two-node ejabberd cluster (`scripts/stack start --nodes 2`), started once for
this module as README.md shows it: certificates published on one node are found from the
other, a capsule queued offline is delivered on the other node, a room has occupants on both,
and when node 1 is SIGKILLed its bots move to node 2 by themselves and every capsule is
delivered once or reported undelivered.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from slixmpp import JID, ClientXMPP

from capsule.connection import (
    ENDPOINTS_ENV,
    LoginError,
    Reconnect,
    endpoints_from_env,
    login,
    tls_context,
)
from capsule.plugin import attach, attach_async
from capsule.testing.identities import enroll
from capsule.testing.inbox import Inbox
from capsule_stack.cluster import ClusterStack, open_stack
from capsule_stack.fixtures import BOT_PIN, Account, Bot
from capsule_stack.rows import wait_stored

from .helpers import (
    Ledger,
    capsule_of,
    rng,
    running_cluster,
    settle,
    stack_command,
    verified_sender,
)

BURST = 100
FLEET = 6


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStack]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as stack:
        yield stack


NodeBot = Callable[..., Awaitable[Bot]]


def secret(label: str) -> str:
    """A unique plaintext, so that one found in the server's rows is ours."""
    return f"{label} {secrets.token_hex(8)}"


@pytest_asyncio.fixture
async def node_bot(cluster: ClusterStack, tmp_path: Path) -> AsyncIterator[NodeBot]:
    """``await node_bot("alice", node=2)``: a fresh account and profile, a capsule client logged
    in on that node, knowing every node's endpoint; ``account=``/``profile=`` log one in again,
    ``client=`` brings a client with handlers already added."""
    clients: list[ClientXMPP] = []

    async def make(name: str, node: int, account: Account | None = None,
                   profile: Path | None = None, client: ClientXMPP | None = None,
                   **config: Any) -> Bot:
        if account is None:
            user, password = f"{name}-{secrets.token_hex(4)}", secrets.token_urlsafe(12)
            account = Account(user, password, cluster.adduser(user, password))
        if profile is None:
            profile = tmp_path / f"{account.user}.capsule"
            enroll(cluster.authority(), profile, account.jid, BOT_PIN)
        client = client or ClientXMPP(account.jid, account.password)
        clients.append(client)
        published = attach(client, profile, BOT_PIN, endpoints=cluster.info.endpoints, **config)
        client.add_event_handler("session_start", lambda _: client.send_presence())
        host, port = cluster.info.endpoints[node - 1]
        await login(client, host, port, cluster.info.ca_root)
        await published(30)
        return Bot(client, account, profile, BOT_PIN)

    yield make
    for client in clients:
        if client.is_connected():
            await client.disconnect(wait=1)
    gc.collect()


def test_stack_start_nodes_2_as_the_readme_shows(cluster):
    """Two nodes in one cluster, distribution on loopback only, the cookie private, each node's
    ports in status and in the exports."""
    status = stack_command("status", "--dir", cluster.dir)
    assert status.returncode == 0, status.stderr
    nodes = cluster.cluster_nodes()
    assert sorted(cluster.members()) == sorted(n.erlang_node for n in nodes)
    for node in nodes:
        assert (f"node {node.index}   {node.erlang_node}: c2s {node.c2s_port}, "
                f"http {node.http_port}, distribution {cluster.info.dist_port}; in the cluster"
                in status.stdout), status.stdout
    assert "server2  pid" in status.stdout
    exports = stack_command("status", "--exports", "--dir", cluster.dir).stdout
    ports = " ".join(f"127.0.0.1:{n.c2s_port}" for n in nodes)
    assert f"export CAPSULE_ENDPOINTS='{ports}'" in exports
    cookie = cluster.dir / ".erlang.cookie"
    assert cookie.stat().st_mode & 0o777 == 0o600
    # every listening socket of the cluster's Erlang VMs is on a loopback address
    listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True,
                               check=True).stdout
    pids = {cluster.info.pids[n.pid_key] for n in nodes}
    sockets = [line.split()[3] for line in listening.splitlines()
               if any(f"pid={pid}," in line for pid in pids)]
    assert f"127.0.0.2:{cluster.info.dist_port}" in sockets
    assert sockets and all(s.startswith("127.") for s in sockets), sockets
    # a second start of a running cluster is harmless, and the node count is the stack's
    assert stack_command("start", "--dir", cluster.dir).returncode == 0
    again = stack_command("start", "--nodes", 3, "--dir", cluster.dir)
    assert again.returncode == 1 and "has 2 node(s), not 3" in again.stderr
    assert cluster.info.pids == open_stack(cluster.dir).info.pids


async def test_capsules_between_nodes_found_through_pep(node_bot, cluster):
    alice, bob = await node_bot("alice", 1), await node_bot("bob", 2)
    to_bob, to_alice = Inbox(bob.client), Inbox(alice.client)
    text = secret("node 1 to node 2")
    await alice.capsule.send(bob.jid, text)  # bob's certificates: published on node 2
    msg = await to_bob.message()
    assert msg["body"] == text and verified_sender(msg) == alice.jid
    reply = secret("node 2 to node 1")
    await bob.capsule.send(alice.jid, reply)
    assert (await to_alice.message())["body"] == reply
    archive = "\n".join(cluster.stored("archive", bob.account.user))
    assert archive and text not in archive and reply not in archive


async def test_offline_capsule_delivered_on_the_other_node(node_bot, cluster):
    bob = await node_bot("bob", 1)
    await bob.client.disconnect()
    alice = await node_bot("alice", 1)
    text = secret("queued on node 1")
    await alice.capsule.send(bob.jid, text)
    await wait_stored(cluster, "offline", bob.account.user)
    client = ClientXMPP(bob.jid, bob.account.password)
    inbox = Inbox(client)
    await node_bot("bob", 2, account=bob.account, profile=bob.profile, client=client)
    msg = await inbox.message()
    assert msg["body"] == text and verified_sender(msg) == alice.jid
    await wait_stored_empty(cluster, bob.account.user)


async def wait_stored_empty(cluster: ClusterStack, user: str) -> None:
    for _ in range(100):
        if not await asyncio.to_thread(cluster.stored, "offline", user):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the offline queue of {user} was not emptied by the delivery")


async def test_group_chat_with_occupants_on_both_nodes(node_bot, cluster):
    alice, bob, carol = (await node_bot("alice", 1), await node_bot("bob", 2),
                         await node_bot("carol", 2))
    room = JID(f"capsule-{secrets.token_hex(4)}@conference.{cluster.info.domain}")
    for bot, nick in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
        await bot.client.plugin["xep_0045"].join_muc_wait(room, nick, maxchars=0)
    everyone = sorted(b.jid for b in (alice, bob, carol))
    loop = asyncio.get_running_loop()
    began = loop.time()
    while sorted(bob.capsule.occupants(str(room))) != everyone:
        assert loop.time() - began < 15, "occupants not seen"
        await asyncio.sleep(0.1)
    inboxes = {b.jid: Inbox(b.client) for b in (alice, bob, carol)}
    text = secret("to the room from node 2")
    await bob.capsule.send_groupchat(room, text)
    for jid, inbox in inboxes.items():
        msg = await inbox.message()
        assert msg["type"] == "groupchat" and msg["body"] == text, jid
        assert verified_sender(msg) == bob.jid


async def test_node_killed_its_bots_move_and_nothing_is_lost_silently(node_bot, cluster):
    """It kills node 1; the next test brings it back with `restart`."""
    schedule = rng("cluster")
    # bounded: a capsule a dying node swallowed after its ack is resent halfway through the
    # receipt timeout (or at once, on the new session of a bot that moved), else reported
    alice, carol = (await node_bot("alice", 1, receipt_timeout=60),
                    await node_bot("carol", 1, receipt_timeout=60))
    bob, dave = (await node_bot("bob", 2, receipt_timeout=60),
                 await node_bot("dave", 2, receipt_timeout=60))
    ledgers = {"alice->bob": Ledger(alice.client, bob.client),
               "dave->carol": Ledger(dave.client, carol.client)}
    sent: dict[str, dict[str, str]] = {name: {} for name in ledgers}
    kill_at = schedule.randrange(10, BURST - 10)
    for i in range(BURST):
        if i == kill_at:
            await asyncio.to_thread(cluster.kill_node, 1)
        for name, sender, receiver in (("alice->bob", alice, bob), ("dave->carol", dave, carol)):
            body = f"{name} {i}"
            [sid] = await sender.capsule.send(receiver.jid, body)
            sent[name][sid] = body
        await asyncio.sleep(0)
    for name, ledger in ledgers.items():
        await settle(ledger, sent[name], timeout=90)
    node2 = cluster.info.endpoints[1]
    for bot in (alice, carol):  # node 1's bots went to node 2 by themselves
        assert bot.client.custom_address == node2 and bot.client.sessionstarted
    for name, ledger in ledgers.items():
        print(f"{name}: node 1 killed at {kill_at}: {len(sent[name])} sent, "
              f"{len(ledger.acked)} acked, {len(ledger.confirmed)} confirmed, "
              f"{len(ledger.undelivered)} reported undelivered")
        ledger.check(sent[name])


async def test_a_fleet_whose_first_node_dies_while_it_starts_logs_in_on_the_other(
        cluster, tmp_path):
    """After `restart` (node 1 back, whatever ran before), a fleet starts as README shows it
    (attach_async, then connect to node 1) and node 1 is SIGKILLed midway: the bots it had,
    and those whose first connect it refuses, all log in on node 2 by themselves. The last
    cluster test here: node 1 stays dead."""
    restarted = stack_command("restart", "--dir", cluster.dir)
    assert restarted.returncode == 0, restarted.stderr
    status = stack_command("status", "--dir", cluster.dir).stdout
    assert status.count("; in the cluster") == 2, status
    stack = open_stack(cluster.dir)  # the PIDs as restart left them
    assert isinstance(stack, ClusterStack)
    node1, node2 = stack.info.endpoints
    clients: list[ClientXMPP] = []
    on_node: dict[str, int | None] = {}  # the port of each bot's newest session
    published = []
    accounts = []
    for i in range(FLEET):  # accounts and profiles first: the stack's tools need node 1
        user, password = f"fleet{i}-{secrets.token_hex(4)}", secrets.token_urlsafe(12)
        jid = stack.adduser(user, password)
        enroll(stack.authority(), tmp_path / f"{user}.capsule", jid, BOT_PIN)
        accounts.append((jid, password, tmp_path / f"{user}.capsule"))
    try:
        for i, (jid, password, profile) in enumerate(accounts):
            client = ClientXMPP(jid, password)
            client.enable_direct_tls = False
            client.ssl_context = tls_context(stack.info.ca_root)
            clients.append(client)
            published.append(await attach_async(client, profile, BOT_PIN,
                                                endpoints=stack.info.endpoints))

            def up(_event: Any, client: ClientXMPP = client) -> None:
                client.send_presence()
                assert client.transport is not None
                on_node[client.boundjid.bare] = client.transport.get_extra_info("peername")[1]

            client.add_event_handler("session_start", up)
            client.add_event_handler("session_resumed", up)
            client.connect(*node1)
            if i == FLEET // 2 - 1:  # half the fleet logging in there, the rest not yet
                await asyncio.to_thread(stack.kill_node, 1)
        await asyncio.gather(*(wait(60) for wait in published))
        loop = asyncio.get_running_loop()
        began = loop.time()
        while sorted(on_node.items()) != sorted((c.boundjid.bare, node2[1]) for c in clients):
            assert loop.time() - began < 60, f"not all on node 2 ({node2[1]}): {on_node}"
            await asyncio.sleep(0.2)
        first, last = clients[0], clients[-1]
        inbox, text = Inbox(last), secret("fleet, both on node 2")
        await capsule_of(first).send(last.boundjid.bare, text)
        msg = await inbox.message()
        assert msg["body"] == text and verified_sender(msg) == first.boundjid.bare
    finally:
        for client in clients:
            if client.is_connected():
                await client.disconnect(wait=1)
        gc.collect()


async def test_reconnect_goes_round_the_endpoints_and_reads_them_from_the_stack(monkeypatch):
    """Server-free: which endpoint the next attempt takes, and $CAPSULE_ENDPOINTS as exported."""
    nodes = [("127.0.0.1", 5222), ("127.0.0.1", 5223), ("127.0.0.1", 5224)]
    client = ClientXMPP("bot@capsule.test", "pw")
    client.custom_address = nodes[1]
    reconnect = Reconnect(client, endpoints=nodes)
    taken = []
    for _ in range(3):
        host, port = reconnect._next_address()
        assert host is not None and port is not None
        taken.append((host, port))
        client.custom_address = (host, port)  # as client.connect(host, port) records it
    assert taken == [nodes[2], nodes[0], nodes[1]]
    client.custom_address = ("127.0.0.1", 9999)  # connected elsewhere: start from the first
    assert reconnect._next_address() == nodes[0]
    assert Reconnect(ClientXMPP("b@capsule.test", "pw"))._next_address() == (None, None)
    monkeypatch.setenv(ENDPOINTS_ENV, "127.0.0.1:5222 127.0.0.1:5223")
    assert endpoints_from_env() == nodes[:2]
    monkeypatch.setenv(ENDPOINTS_ENV, "127.0.0.1:5222 5223")
    with pytest.raises(LoginError, match="'5223' is not host:port"):
        endpoints_from_env()
