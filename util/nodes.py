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

import ipaddress
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


def ipv6_addresses(path: str = "/proc/net/if_inet6") -> list[tuple[str, str]]:
    """(interface, IPv6 address) of every IPv6 address of this machine (Linux; none where unreadable)."""
    try:
        with open(path) as f:
            rows = [line.split() for line in f]
    except OSError:
        return []
    return [(r[5], str(ipaddress.IPv6Address(bytes.fromhex(r[0])))) for r in rows if len(r) == 6]


def address_of(interface: str) -> str | None:
    """An address of a network interface, IPv4 first, else IPv6 (gloo binds to either), or None."""
    return ipv4_of(interface) or next((a for i, a in ipv6_addresses() if i == interface), None)


def interface_of(address: str) -> str | None:
    """The name of the network interface holding `address` (IPv4 or IPv6; Linux), or None."""
    if ":" in address:
        return next((i for i, a in ipv6_addresses() if ipaddress.ip_address(a) == ipaddress.ip_address(address)), None)
    if ipaddress.ip_address(address).is_loopback:  # 127.0.1.1 (Debian's host name) is lo's too
        return next((name for _, name in socket.if_nameindex() if (ipv4_of(name) or "").startswith("127.")), None)
    return next((name for _, name in socket.if_nameindex() if ipv4_of(name) == address), None)


def hostname_address(host: str) -> str | None:
    """The address gloo binds to without GLOO_SOCKET_IFNAME: the first of what `host` resolves to (IPv4 or
    IPv6) that a socket of this machine can bind; None: none (gloo then falls back to loopback)."""
    try:
        found = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except OSError:
        return None
    for family, kind, proto, _, address in found:
        try:
            with socket.socket(family, kind, proto) as s:
                s.bind((address[0], 0, *address[2:]))
        except OSError:
            continue
        return address[0]
    return None


def local_info(backends: list[str]) -> dict:
    """This process: host, gloo [interface, address (None: GLOO_SOCKET_IFNAME names no such interface),
    how it was chosen], NCCL_SOCKET_IFNAME (with NCCL), its CPUs (affinity)."""
    host = socket.gethostname()
    chosen = os.environ.get("GLOO_SOCKET_IFNAME")
    if chosen:
        interface = chosen.split(",")[0]
        gloo = [interface, address_of(interface), f"GLOO_SOCKET_IFNAME={chosen}"]
    else:
        address = hostname_address(host) or "127.0.0.1"  # gloo falls back to loopback
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
            return f"{how} on node {host}: no such network interface with an address (ip -br addr lists them)", []
        if ipaddress.ip_address(address).is_loopback and len(by_host) > 1:
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
