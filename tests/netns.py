"""Other hosts for tests: network namespaces on one Linux bridge.

Each `Lan` makes a bridge in the root namespace (the test process reaches
every host through it) and one namespace per host name, joined to the
bridge by a veth pair, with a private 10.x.y.0/24 address. Names carry a
random tag so parallel runs never collide, and everything is deleted on
exit whatever happened. Needs root and iproute2 (`skip_reason` says why
not)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"lmxprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Lan:
    def __init__(self, hosts: Sequence[str]) -> None:
        self.tag = secrets.token_hex(3)
        # 10.<1..254>.<1..254>.0/24: a fresh subnet per run.
        a, b = (1 + secrets.randbelow(254) for _ in range(2))
        self.prefix = f"10.{a}.{b}"
        self.bridge = f"lmxb{self.tag}"
        self.namespaces: dict[str, str] = {}
        self.addresses: dict[str, str] = {}
        self._veths: dict[str, str] = {}
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.prefix}.254/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for index, host in enumerate(hosts, start=1):
                self._add_host(index, host)
        except BaseException:
            self.close()
            raise

    def _add_host(self, index: int, host: str) -> None:
        ns = f"lmx{self.tag}{host}"
        outer, inner = f"lv{self.tag}{index}", f"li{self.tag}{index}"
        _ip("netns", "add", ns)
        self.namespaces[host] = ns
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        self._veths[host] = outer
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", outer, "master", self.bridge)
        _ip("link", "set", outer, "up")
        _ip("-n", ns, "link", "set", inner, "name", "eth0")
        address = f"{self.prefix}.{index}"
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self.addresses[host] = address

    def prefix_for(self, host: str) -> list[str]:
        """The command prefix that runs a program on `host`."""
        return ["ip", "netns", "exec", self.namespaces[host]]

    def link(self, host: str, up: bool) -> None:
        """Cut (or restore) `host`'s only network link."""
        _ip("-n", self.namespaces[host], "link", "set", "eth0", "up" if up else "down")

    def close(self) -> None:
        for ns in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        for veth in self._veths.values():  # gone with its namespace, normally
            subprocess.run(["ip", "link", "del", veth], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)
        self.namespaces.clear()

    def __enter__(self) -> Lan:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
