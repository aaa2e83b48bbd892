"""Private redis-server processes for the tests (never the machine's shared Redis)."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The single-server helpers are the benchmark's own (shared, not copied).
from benchmarks.local_redis import (
    RedisProcess,
    find_redis_server,
    free_port,
    start_redis,
)

__all__ = ["RedisProcess", "find_redis_server", "free_port", "start_redis"]


# ---------------------------------------------------------------- scale-out topologies (§11)


def _command(port: int, *args: str, timeout_s: float = 2.0) -> object:
    """One command to a loopback Redis (or sentinel) on ``port``: the raw reply, decoded."""
    import redis

    with redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=timeout_s, decode_responses=True
    ) as client:
        client.response_callbacks.clear()  # INFO as text, SENTINEL replies as flat lists
        return client.execute_command(*args)


def _fields(reply: Any) -> dict[str, str]:
    """A field/value reply (a flat RESP2 list or a RESP3 map) as a dict of strings."""
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    return {str(k): str(v) for k, v in zip(reply[::2], reply[1::2], strict=True)}


def _wait_until(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # not up yet: keep polling until the deadline
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout_s}s waiting for {what}")


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass
class RedisClusterProcesses:
    """A Redis Cluster of masters only, every slot assigned, on loopback."""

    nodes: list[RedisProcess]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_redis_cluster(masters: int = 3) -> RedisClusterProcesses:
    """Start ``masters`` cluster-enabled redis-servers and split the 16384 slots among them.

    Slots are assigned with CLUSTER ADDSLOTS and the nodes joined with CLUSTER MEET (what
    ``redis-cli --cluster create`` does), so no redis-cli is needed.
    """
    nodes: list[RedisProcess] = []
    cluster = RedisClusterProcesses(nodes)
    try:
        for _ in range(masters):
            port = _free_cluster_port()
            nodes.append(
                start_redis(
                    port,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    "--cluster-node-timeout",
                    "2000",
                )
            )
        per_node = 16384 // masters
        for i, node in enumerate(nodes):
            first = i * per_node
            last = 16383 if i == masters - 1 else first + per_node - 1
            slots = [str(slot) for slot in range(first, last + 1)]
            _command(node.port, "CLUSTER", "ADDSLOTS", *slots)
        for node in nodes[1:]:
            _command(nodes[0].port, "CLUSTER", "MEET", "127.0.0.1", str(node.port))

        def ready() -> bool:
            for node in nodes:
                info = str(_command(node.port, "CLUSTER", "INFO"))
                if "cluster_state:ok" not in info or f"cluster_known_nodes:{masters}" not in info:
                    return False
            return True

        _wait_until("the cluster to agree on its slots", ready, 20)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass
class SentinelProcess:
    port: int
    process: subprocess.Popen[bytes]
    directory: str

    def stop(self) -> None:
        RedisProcess(self.port, self.process, self.directory).stop()


@dataclass
class SentinelSet:
    """A master, its replicas and three sentinels (quorum 2) watching ``service``."""

    service: str
    servers: list[RedisProcess]  # [initial master, *initial replicas]
    sentinels: list[SentinelProcess]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    def master_port(self) -> int:
        """The master's port as the sentinels currently see it."""
        _host, port = _command(  # type: ignore[misc]
            self.sentinels[0].port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
        )
        return int(port)

    def wait_healthy(self, timeout_s: float = 20.0) -> None:
        """Every sentinel sees the master, a replica and the two other sentinels, and the
        replica's link is up: a failover can be ordered."""
        master = self.master_port()

        def healthy() -> bool:
            for sentinel in self.sentinels:
                state = _command(sentinel.port, "SENTINEL", "MASTER", self.service)
                fields = _fields(state)
                if int(fields["port"]) != master or "s_down" in fields["flags"]:
                    return False
                replicas_expected = len(self.servers) - 1
                if int(fields["num-slaves"]) < replicas_expected:
                    return False
                if int(fields["num-other-sentinels"]) < len(self.sentinels) - 1:
                    return False
                replicas = _command(sentinel.port, "SENTINEL", "REPLICAS", self.service)
                for replica in replicas:  # type: ignore[attr-defined]
                    replica_fields = _fields(replica)
                    if replica_fields.get("master-link-status") != "ok":
                        return False
                    if "s_down" in replica_fields["flags"]:
                        return False
            info = str(_command(master, "INFO", "replication"))
            return f"connected_slaves:{len(self.servers) - 1}" in info

        _wait_until(f"sentinel set {self.service} to be healthy", healthy, timeout_s)

    def failover(self, timeout_s: float = 20.0) -> int:
        """Order a failover; return the new master's port once every sentinel agrees."""
        old = self.master_port()
        _command(self.sentinels[0].port, "SENTINEL", "FAILOVER", self.service)

        def moved() -> bool:
            ports = {
                int(
                    _command(  # type: ignore[index]
                        s.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
                    )[1]
                )
                for s in self.sentinels
            }
            if len(ports) != 1 or old in ports:
                return False
            (new,) = ports
            return "role:master" in str(_command(new, "INFO", "replication"))

        _wait_until("the failover to complete", moved, timeout_s)
        return self.master_port()

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.stop()


def start_sentinel_set(service: str = "rlgw", replicas: int = 1) -> SentinelSet:
    """A master, ``replicas`` replicas and three sentinels (quorum 2), all on loopback.

    Sentinels notice a dead master after 500 ms; a failover may take 2 s.
    """
    binary = find_redis_server()
    # No diskless-sync delay: a replica (or a demoted master) resyncs at once.
    fast_sync = ("--repl-diskless-sync-delay", "0")
    master = start_redis(None, *fast_sync)
    sentinel_set = SentinelSet(service, [master], [])
    try:
        for _ in range(replicas):
            replica = start_redis(None, *fast_sync, "--replicaof", "127.0.0.1", str(master.port))
            sentinel_set.servers.append(replica)
            _wait_until(
                "the replica to sync",
                lambda port=replica.port: (
                    "master_link_status:up"  # type: ignore[misc]
                    in str(_command(port, "INFO", "replication"))
                ),
                10,
            )
        for _ in range(3):
            port = free_port()
            directory = tempfile.mkdtemp(prefix="rlgw-sentinel-")
            config = Path(directory) / "sentinel.conf"
            config.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f"dir {directory}\n"
                f"sentinel monitor {service} 127.0.0.1 {master.port} 2\n"
                f"sentinel down-after-milliseconds {service} 500\n"
                f"sentinel failover-timeout {service} 2000\n"
                f"sentinel parallel-syncs {service} 1\n"
            )
            process = subprocess.Popen(
                [binary, str(config), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            sentinel_set.sentinels.append(SentinelProcess(port, process, directory))
        sentinel_set.wait_healthy()
    except BaseException:
        sentinel_set.stop()
        raise
    return sentinel_set
