"""What the OS says about memory: the machine's, and one worker's."""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class SystemMemory:
    total: int
    available: int

    @property
    def used(self) -> int:
        return self.total - self.available

    @property
    def percent(self) -> float:
        return 100.0 * self.used / self.total if self.total else 0.0


def system_memory() -> SystemMemory:
    vm = psutil.virtual_memory()
    return SystemMemory(int(vm.total), int(vm.available))


@dataclass(frozen=True)
class WorkerMemory:
    rss: int  # resident
    vms: int  # address space
    data: int  # private writable memory: what RLIMIT_DATA counts


def worker_memory(pid: int | None) -> WorkerMemory | None:
    if pid is None:
        return None
    try:
        info = psutil.Process(pid).memory_info()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return WorkerMemory(int(info.rss), int(info.vms), int(getattr(info, "data", 0)))
