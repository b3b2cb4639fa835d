"""What the nodes of a launch are, told before the first collective: each process posts its host, the
network interface its gloo sockets will use and its CPUs to the launcher's store (a TCP connection to
MASTER_ADDR, which works whatever gloo would pick); rank 0 reads them all, checks them and answers
with one verdict that every process reads (`exchange`), so that a misconfigured multi-node run stops
at once with one line instead of hanging in its first collective until --dist_timeout.

Gloo (the control group, used every step; every collective of a CPU run) binds to GLOO_SOCKET_IFNAME,
else to the address the host name resolves to, which on some clusters is loopback (Debian's
127.0.1.1): the other nodes cannot reach it. NCCL takes NCCL_SOCKET_IFNAME, else its own choice
(InfiniBand / RoCE when present, else the first interface that is not loopback or docker).
"""

import json
import os
import socket


def ipv4_of(interface: str) -> str | None:
    """The IPv4 address of a network interface (Linux), or None (no such interface, or none)."""
    import fcntl
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", interface[:15].encode()))  # SIOCGIFADDR
    except OSError:
        return None
    return socket.inet_ntoa(packed[20:24])


def interface_of(address: str) -> str | None:
    """The name of the network interface holding the IPv4 `address` (Linux), or None."""
    return next((name for _, name in socket.if_nameindex() if ipv4_of(name) == address), None)


def local_info(backends: list[str]) -> dict:
    """This process: host, gloo [interface, IPv4 address (None: GLOO_SOCKET_IFNAME names no such
    interface), how it was chosen], NCCL_SOCKET_IFNAME (with NCCL), its CPUs (affinity)."""
    host = socket.gethostname()
    chosen = os.environ.get("GLOO_SOCKET_IFNAME")
    if chosen:
        interface = chosen.split(",")[0]
        gloo = [interface, ipv4_of(interface), f"GLOO_SOCKET_IFNAME={chosen}"]
    else:
        try:
            address = socket.gethostbyname(host)
        except OSError:
            address = "127.0.0.1"  # gloo falls back to loopback
        gloo = [interface_of(address) or "?", address, f"what host name {host} resolves to; GLOO_SOCKET_IFNAME unset"]
    nccl = os.environ.get("NCCL_SOCKET_IFNAME") if "nccl" in backends else None
    return {"host": host, "gloo": gloo, "nccl": nccl, "nccl_used": "nccl" in backends, "cpus": cpus()}


def cpus() -> list[int]:
    """The CPUs this process may run on (its affinity; all of them where that cannot be read)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _hosts_text(hosts: list[str]) -> str:
    return ", ".join(hosts[:3]) + (f" and {len(hosts) - 3} more" if len(hosts) > 3 else "")


def describe_nodes(infos: list[dict]) -> tuple[str | None, list[str]]:
    """(the error that stops the launch, or None; the lines rank 0 prints) for the local_info of every
    rank, in rank order. Errors: GLOO_SOCKET_IFNAME naming an interface a node lacks; gloo on a
    loopback address while the ranks span several hosts. Warning: a node whose processes share fewer
    CPUs than there are processes (srun without --cpus-per-task since Slurm 22.05)."""
    by_host = {}
    for info in infos:
        by_host.setdefault(info["host"], []).append(info)
    groups = {}  # (interface, how) -> hosts
    for host, procs in by_host.items():
        interface, address, how = procs[0]["gloo"]
        if address is None:
            return f"{how} on node {host}: no such network interface with an IPv4 address (ip -br addr lists them)", []
        if address.startswith("127.") and len(by_host) > 1:
            return (
                f"gloo on node {host} would use the loopback address {address} ({how}) but the job spans "
                f"{len(by_host)} nodes, which cannot reach it: set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) to "
                "the interface the nodes reach each other on (ip -br addr lists them)",
                [],
            )
        key = (interface, how if how.startswith("GLOO") else "host name", address if len(by_host) == 1 else None)
        groups.setdefault(key, []).append(host)
    parts = []
    if infos[0]["nccl_used"]:
        nccl = sorted({i["nccl"] or "unset" for i in infos})
        parts.append(
            "nccl on its own choice (NCCL_SOCKET_IFNAME unset)"
            if nccl == ["unset"]
            else f"nccl on NCCL_SOCKET_IFNAME={' / '.join(nccl)}"
        )
    for (interface, how, address), hosts in groups.items():
        where = f" at {_hosts_text(hosts)}" if len(by_host) > 1 else ""
        detail = f"{address}, {infos[0]['gloo'][2]}" if address else how
        parts.append(f"gloo on {interface} ({detail}){where}")
    lines = ["network: " + "; ".join(parts)]
    shapes = {}
    for host, procs in by_host.items():
        shared = len(set().union(*(p["cpus"] for p in procs)))
        shapes.setdefault((len(procs), shared), []).append(host)
        if shared < len(procs):
            lines.append(
                f"warning: the {len(procs)} processes on node {host} share {shared} CPU(s): data loading will "
                "crawl; under SLURM give srun --cpus-per-task (or SRUN_CPUS_PER_TASK), which it does not inherit "
                "from sbatch since Slurm 22.05"
            )
    lines.insert(
        1,
        "processes: " + "; ".join(f"{_hosts_text(h)}: {n} process(es) on {c} CPU(s)" for (n, c), h in shapes.items()),
    )
    return None, lines


def exchange(store, rank: int, world_size: int, info: dict) -> tuple[str | None, list[str]]:
    """Collective over the launcher's store (no process group needed): every rank posts `info`, rank 0
    reads them all and posts describe_nodes()'s verdict, which every rank returns (the lines: rank 0's)."""
    store.set(f"jit_node/{rank}", json.dumps(info))
    if rank == 0:
        infos = [json.loads(v) for v in store.multi_get([f"jit_node/{r}" for r in range(world_size)])]
        store.set("jit_node/verdict", json.dumps(describe_nodes(infos)))
    error, lines = json.loads(store.get("jit_node/verdict"))
    store.set(f"jit_node/read/{rank}", "1")
    if rank == 0:  # rank 0 may serve the store: it leaves only once every rank has the verdict
        store.wait([f"jit_node/read/{r}" for r in range(world_size)])
    return error, lines
