"""One owner for device memory: which models are loaded, on which device, in which dtype, and what they take.

Generic over torch modules: torch is imported only inside `TorchMemory`'s methods (runtime/memory.py), so
`import runtime` stays torch-free, and the manager itself only calls `parameters()`, `buffers()`, `children()`
and forward hooks. Nodes never move weights; they ask for a model for the duration of a call:

    with manager.use(handle, working=bytes_the_computation_needs) as module:
        ...

Policies, in the order they apply:

1. **Identity.** A `ModelHandle` is (origin, version, variant), e.g. the file and part, the file's size and
   modification time, the dtype. Values passed between nodes hold handles, not weights, so a cached MODEL value
   pins no memory. When a handle arrives whose origin is loaded under another version, the file was replaced:
   the stale weights are dropped at once and the new ones are read (ComfyUI keeps serving the stale ones).
2. **Lazy loading.** Nothing is read until a model is used; the handle's `load(device)` builds it there.
3. **Budgets.** room(device) = min(budget - bytes of models held there, free bytes now - reserve). Budgets are
   optional per device or device type (`--ram-budget`, `--vram-budget`); free bytes come from `DeviceMemory`
   (`torch.cuda.mem_get_info` on CUDA, MemAvailable on the CPU).
4. **Eviction.** Until a request (model + working memory) fits: the least recently used idle model on that device
   goes first, but models that nodes still to run will use (`lookahead`) go last. From an accelerator a model is
   offloaded to the CPU if the CPU has room (else dropped); from the CPU it is dropped, because its loader can
   read it again from the (memory-mapped) file.
5. **Streaming (lowvram).** A model that cannot fit whole on an accelerator stays on the CPU and runs with its
   blocks moved to the accelerator one at a time. On the CPU there is nowhere else to stream from: the model is
   loaded whole after every idle model has been evicted, and a warning says the budget is exceeded.
6. **Out of memory.** `guard(call)` catches an out-of-memory error, unloads every idle model, releases caches
   and calls once more; a second failure raises `OutOfMemory` saying what was needed and what was free. Nothing
   stays marked in use, so the next call starts clean.
7. **Decisions.** Every eviction, offload, stream, residency drop or keep and over-budget load is noted with the
   node it happened in and why (who needed how much, what the budget left): `decisions(node_id)`, printed by
   `run --explain`.
8. **Residency inside a run.** Before a model is placed in RAM during a run, an idle model that no remaining node
   uses and that is cheap to reload (`cheap_reload`: text encoders) is dropped if keeping it would raise the
   process's peak footprint; models expensive to reload stay for the next prompt (runtime/residency.py), unless
   the process runs no next prompt (`next_prompt=False`: `sdgraph run` of one graph).
9. **Patches.** A handle may carry patches (LoRAs) and the function that applies them. Patches are not part of the
   identity: one copy of the weights is loaded, and when a handle asks for another patch set than the module has,
   the manager calls `handle.patch(module, patches)` before handing the module out (diffusion/lora.py computes
   patched weights from the untouched originals, so nothing is re-read and removing a set is exact).
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .memory import (
    DeviceMemory,
    GiB,
    MiB,
    TorchMemory,
    direct_bytes,
    format_bytes,
    is_out_of_memory,
    module_bytes,
)
from .residency import Resident, Verdict, hold_peak

log = logging.getLogger("sdgraph.models")

# Kept free on each device type for what the manager does not account for (allocator slack, other processes).
DEFAULT_RESERVES = {"cpu": 1 * GiB, "cuda": 768 * MiB}
SETTLE_ABOVE = 64 * MiB  # after a call that asked for this much working memory, freed memory is given back
_ALLOCATION = re.compile(r"(?:tried to allocate|allocate)\s+([\d.]+)\s*(bytes|[KMG]i?B)", re.IGNORECASE)
DECISIONS_KEPT = 256  # the latest placement decisions kept for `--explain`
_UNITS = {"bytes": 1, "kb": 1 << 10, "kib": 1 << 10, "mb": MiB, "mib": MiB, "gb": GiB, "gib": GiB}


class OutOfMemory(RuntimeError):
    """A computation did not fit in memory even after every idle model was unloaded and it was tried again."""


@dataclass(frozen=True)
class ModelHandle:
    """What a node value holds instead of weights. Equal handles are the same model in the same form.

    origin: what the weights come from, e.g. "/models/a.safetensors#unet".
    version: what changes when the origin is replaced, e.g. the file's (size, mtime_ns).
    variant: how the weights are materialised, e.g. ("bfloat16",); other variants are other copies.
    weight_bytes: bytes of the loaded weights (from the file's header, before loading).
    device: where it computes ("cpu", "cuda:0").
    load: builds the module on a torch device ("cpu", "cuda:0"); called by the manager only.
    streamable: its computation goes through submodule forwards, so blocks can be streamed (lowvram).
    patches: what `patch(module, patches)` makes the loaded module compute with (e.g. LoRAs and their strengths);
        not part of the identity, so handles that differ only in patches share one loaded copy of the weights.
    cheap_reload: reading it again is a plain copy out of its (memory-mapped) file and the nodes that use it cache
        their outputs (text encoders): inside a run it is dropped when keeping it idle would raise the process's
        peak (runtime/residency.py).
    """

    origin: str
    version: tuple = ()
    variant: tuple = ()
    weight_bytes: int = field(default=0, compare=False)
    device: str = field(default="cpu", compare=False)
    load: Callable[[str], Any] | None = field(default=None, compare=False, repr=False)
    label: str = field(default="", compare=False)
    streamable: bool = field(default=False, compare=False)
    patches: tuple = field(default=(), compare=False)
    patch: Callable[[Any, tuple], None] | None = field(default=None, compare=False, repr=False)
    cheap_reload: bool = field(default=False, compare=False)

    @property
    def name(self) -> str:
        return self.label or self.origin


def handles_in(values: Iterable[Any]) -> set[ModelHandle]:
    """Handles held by node values: a ModelHandle itself, or any object with a `model_handles()` method."""
    found: set[ModelHandle] = set()
    for value in values:
        if isinstance(value, ModelHandle):
            found.add(value)
        elif callable(getattr(value, "model_handles", None)):
            found.update(value.model_handles())
        elif isinstance(value, list | tuple):
            found.update(handles_in(value))
    return found


def _normalise(device: str) -> str:
    return "cuda:0" if device == "cuda" else device


@dataclass
class _Entry:
    handle: ModelHandle
    module: Any = None
    device: str | None = None  # where its weights are; None: not loaded
    nbytes: int = 0
    users: int = 0
    tick: int = 0
    patches: tuple = ()  # the patch set the loaded module currently computes with


@dataclass(frozen=True)
class LoadedModel:
    name: str
    device: str
    nbytes: int
    in_use: bool


@dataclass
class _Request:
    handle: ModelHandle
    device: str
    working: int


class ModelManager:
    """Places models for the whole process (one per Runtime). Thread-safe; calls are short except loading."""

    def __init__(self, memory: DeviceMemory | None = None, *, budgets: Mapping[str, int | None] | None = None,
                 reserves: Mapping[str, int] | None = None, offload_device: str = "cpu", next_prompt: bool = True):
        self.memory: DeviceMemory = memory if memory is not None else TorchMemory()
        self.next_prompt = next_prompt  # False: the process runs one prompt and exits (nothing kept for another)
        self.budgets = {_normalise(k): v for k, v in (budgets or {}).items() if v is not None}
        self.reserves = {**DEFAULT_RESERVES, **(reserves or {})}
        self.offload_device = offload_device
        self.stats: Counter[str] = Counter()  # loads, moves, offloads, drops, streamed, oom_retries
        self._entries: dict[ModelHandle, _Entry] = {}
        self._ticks = itertools.count(1)
        self._upcoming: frozenset[ModelHandle] = frozenset()
        self._request: _Request | None = None
        self._lock = threading.RLock()
        self._node = ""  # the node whose call is placing models (run_node), for the decisions noted
        self._decisions: deque[tuple[str, str]] = deque(maxlen=DECISIONS_KEPT)
        self._peaks: dict[str, int] = {}  # per device: the largest footprint (held + working) needed so far
        self._planning = False  # inside run_node: the look-ahead says what the rest of the run uses

    # -- accounts ---------------------------------------------------------------------------------------------
    def budget(self, device: str) -> int | None:
        device = _normalise(device)
        return self.budgets.get(device, self.budgets.get(device.split(":")[0]))

    def reserve(self, device: str) -> int:
        device = _normalise(device)
        return self.reserves.get(device, self.reserves.get(device.split(":")[0], 0))

    def held(self, device: str) -> int:
        """Bytes of the models whose weights are on `device`."""
        device = _normalise(device)
        return sum(e.nbytes for e in self._entries.values() if e.device == device)

    def room(self, device: str) -> int:
        """What may still be placed on `device`: within its budget and within what is really free."""
        device = _normalise(device)
        free = self.memory.free(device) - self.reserve(device)
        budget = self.budget(device)
        return free if budget is None else min(free, budget - self.held(device))

    def loaded(self) -> list[LoadedModel]:
        """Loaded models, most recently used first."""
        with self._lock:
            entries = sorted((e for e in self._entries.values() if e.device is not None), key=lambda e: -e.tick)
            return [LoadedModel(e.handle.name, e.device, e.nbytes, e.users > 0) for e in entries]

    def loaded_versions(self) -> set[tuple[str, tuple]]:
        """(origin, version) of every model whose weights are loaded: the files a worker holds (scale-out routing)."""
        with self._lock:
            return {(e.handle.origin, e.handle.version) for e in self._entries.values() if e.device is not None}

    def decisions(self, node_id: str) -> list[str]:
        """Why models were unloaded, offloaded, streamed or loaded over budget while node `node_id` ran (the
        latest run's; kept for the last DECISIONS_KEPT decisions)."""
        with self._lock:
            return [text for node, text in self._decisions if node == str(node_id)]

    def _note(self, text: str) -> None:
        log.info("%s", text)
        self._decisions.append((self._node, text))

    def _room_words(self, device: str) -> str:
        budget = self.budget(device)
        within = f" within the {format_bytes(budget)} budget" if budget is not None else ""
        return f"{format_bytes(max(self.room(device), 0))} free{within}"

    def where(self, handle: ModelHandle) -> str | None:
        entry = self._entries.get(handle)
        return entry.device if entry is not None else None

    # -- the one way in ------------------------------------------------------------------------------------------
    @contextmanager
    def use(self, handle: ModelHandle, *, working: int = 0) -> Iterator[Any]:
        """The handle's module, placed on its device for the duration of the block (loaded first if need be),
        with `working` bytes free beside it; streamed block by block if it cannot fit whole."""
        device = _normalise(handle.device)
        with self._lock:
            entry = self._admit(handle)
            self._request = _Request(handle, device, working)
            streamer = self._place(entry, device, max(0, working))
            self._peaks[device] = max(self._peaks.get(device, 0), self.held(device) + max(0, working))
            self._patch(entry, handle)
            entry.users += 1
        try:
            if streamer is None:
                yield entry.module
            else:
                with streamer:
                    yield entry.module
        finally:
            with self._lock:
                entry.users -= 1
                entry.tick = next(self._ticks)
            if working >= SETTLE_ABOVE:
                self.memory.settle(device)

    @contextmanager
    def lookahead(self, handles: Iterable[ModelHandle]) -> Iterator[None]:
        """While the block runs, evict `handles` (what nodes still to run will use) only as a last resort."""
        with self._lock:
            previous, self._upcoming = self._upcoming, frozenset(handles)
        try:
            yield
        finally:
            with self._lock:
                self._upcoming = previous

    def guard(self, call: Callable[[], Any], *, what: str = "the computation") -> Any:
        """`call()`; after an out-of-memory error, unload every idle model and try once more."""
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified just below
            if not is_out_of_memory(exc):
                raise
            first = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            # leave the except block before retrying, so the failed attempt's frames (and tensors) are freed
        log.warning("out of memory in %s (%s); unloading idle models and trying once more", what, first)
        self.stats["oom_retries"] += 1
        self.unload_all()
        try:
            return call()
        except Exception as exc:  # noqa: BLE001
            if not is_out_of_memory(exc):
                raise
            message = self._out_of_memory_message(what, exc)
        self.unload_all()
        raise OutOfMemory(message)

    def run_node(self, call: Callable[[], Any], *, ctx: Any, unload_after: bool = False) -> Any:
        """The executor's `around_node` body: the plan's look-ahead (`ctx.upcoming()`) while the node runs, one
        retry after running out of memory, and with `unload_after` every model no later node needs unloaded."""
        upcoming = handles_in(ctx.upcoming())
        with self._lock:
            previous, self._node = self._node, str(ctx.node_id)
            planning, self._planning = self._planning, True
            self._decisions = deque((d for d in self._decisions if d[0] != self._node), maxlen=DECISIONS_KEPT)
        try:
            with self.lookahead(upcoming):
                result = self.guard(call, what=f"node {ctx.node_id} ({ctx.node_type})")
            if unload_after:
                self.unload_except(upcoming, why="no later node uses it (--unload)")
        finally:
            with self._lock:
                self._node, self._planning = previous, planning
        return result

    # -- freeing ----------------------------------------------------------------------------------------------
    def unload(self, handle: ModelHandle) -> bool:
        with self._lock:
            entry = self._entries.get(handle)
            if entry is None or entry.users:
                return False
            self._drop(entry)
            return True

    def unload_all(self) -> int:
        """Drop every model not in use; returns the bytes released."""
        return self.unload_except(())

    def unload_except(self, keep: Iterable[ModelHandle], *, why: str = "") -> int:
        keep = set(keep)
        with self._lock:
            idle = [e for e in self._entries.values() if e.device is not None and e.users == 0
                    and e.handle not in keep]
            devices = {e.device for e in idle}
            released = sum(e.nbytes for e in idle)
            for entry in idle:
                if why:
                    self._note(f"unloaded {entry.handle.name} ({format_bytes(entry.nbytes)}): {why}")
                self._drop(entry, release=False)
            for device in devices:
                self.memory.release(device)
            return released

    def release(self) -> None:
        """Give freed memory back (allocator caches, heap) on every device models have used."""
        with self._lock:
            for device in {"cpu", *(e.device for e in self._entries.values() if e.device)}:
                self.memory.release(device)

    # -- placement ----------------------------------------------------------------------------------------------
    def _admit(self, handle: ModelHandle) -> _Entry:
        entry = self._entries.get(handle)
        if entry is not None:
            return entry
        for stale in [e for h, e in self._entries.items() if h.origin == handle.origin and h.version != handle.version
                      and e.users == 0]:
            log.info("%s changed on disk; dropping the weights loaded from the old file", stale.handle.name)
            self.stats["stale"] += 1
            self._drop(stale)
        entry = self._entries[handle] = _Entry(handle, nbytes=handle.weight_bytes)
        return entry

    def _place(self, entry: _Entry, device: str, working: int) -> _Streamer | None:
        keep = frozenset({id(entry)})
        need = working if entry.device == device else entry.nbytes + working
        what = (f"{format_bytes(working)} working memory beside its loaded weights" if entry.device == device else
                f"{format_bytes(need)} ({format_bytes(entry.nbytes)} of weights + {format_bytes(working)} working "
                f"memory)")
        why = f"to make room for {entry.handle.name}, which needs {what} on {device},"
        verdict = None
        if self._planning and device == self.offload_device:
            verdict = self._hold_peak(device, need, keep, f"{entry.handle.name} takes {what}")
        self._make_room(device, need, keep, why)
        self._note_kept(verdict, device)
        if entry.device == device:
            return None
        room = self.room(device)
        if room >= need or device == self.offload_device or not entry.handle.streamable:
            if room < need:
                log.warning("%s needs %s on %s (with %s working memory) but only %s is within budget; loading "
                            "it anyway", entry.handle.name, format_bytes(entry.nbytes), device,
                            format_bytes(working), format_bytes(max(room, 0)))
                self._note(f"loaded {entry.handle.name} whole on {device} over budget: it needs "
                           f"{format_bytes(need)} with working memory and only {self._room_words(device)} after "
                           f"unloading every idle model; there is nowhere to stream it from")
                self.stats["over_budget"] += 1
            self._put(entry, device)
            return None
        # an accelerator that cannot hold it whole: keep the weights on the CPU, stream blocks to the device
        self._note(f"streaming {entry.handle.name} block by block to {device}: it needs {format_bytes(need)} with "
                   f"working memory and only {self._room_words(device)}; its weights stay on {self.offload_device}")
        if entry.device != self.offload_device:
            self._make_room(self.offload_device, entry.nbytes, keep, f"to hold {entry.handle.name} for streaming")
            self._put(entry, self.offload_device)
        self.stats["streamed"] += 1
        limit = max((room - working) // 2, 1)
        log.info("%s does not fit on %s (%s free for it); streaming its blocks", entry.handle.name, device,
                 format_bytes(max(room - working, 0)))
        return _Streamer(self.memory, entry.module, home=self.offload_device, device=device, limit=limit)

    def _put(self, entry: _Entry, device: str) -> None:
        if entry.module is None:
            if entry.handle.load is None:
                raise RuntimeError(f"{entry.handle.name} has no loader")
            entry.module = entry.handle.load(device)
            entry.nbytes = module_bytes(entry.module) or entry.handle.weight_bytes
            self.stats["loads"] += 1
        else:
            self.stats["moves"] += 1
        self.memory.move(entry.module, device)
        entry.device = device

    def _patch(self, entry: _Entry, handle: ModelHandle) -> None:
        """Give the module the handle's patch set (removing the previous one) when it differs; the weights are not
        read again. Runs are one at a time, so no other user computes with the previous set meanwhile."""
        if entry.patches == handle.patches:
            return
        if handle.patch is None:
            raise RuntimeError(f"{handle.name} carries patches but no way to apply them")
        handle.patch(entry.module, handle.patches)
        entry.patches = handle.patches
        self.stats["patch_sets"] += 1

    def _hold_peak(self, device: str, need: int, keep: frozenset[int], who: str) -> Verdict:
        """Drop idle models the rest of the run does not use and that are cheap to reload when keeping them would
        raise the device's peak (runtime/residency.py); the verdict's kept models are noted once placed."""
        idle = [Resident(e, e.handle.name, e.nbytes, e.handle in self._upcoming, e.handle.cheap_reload)
                for e in self._entries.values() if e.device == device and e.users == 0 and id(e) not in keep]
        verdict = hold_peak(idle, self.held(device) + need, self._peaks.get(device, 0), who=who,
                            next_prompt=self.next_prompt)
        for resident, why in verdict.drop:
            self._note(why)
            self._drop(resident.key, release=False)
            self.stats["peak_drops"] += 1
        if verdict.drop:
            self.memory.release(device)
        return verdict

    def _note_kept(self, verdict: Verdict | None, device: str) -> None:
        for resident, why in verdict.keep if verdict else ():
            if resident.key.device == device:  # not evicted for the budget meanwhile
                self._note(why)

    def _make_room(self, device: str, need: int, keep: frozenset[int], why: str = "") -> None:
        """Evict idle models from `device` (never those whose id is in `keep`) until `need` bytes fit; `why`
        (whom the room is for) goes into the decisions noted."""
        evicted = False
        while self.room(device) < need:
            idle = [e for e in self._entries.values() if e.device == device and e.users == 0 and id(e) not in keep]
            if not idle:
                break
            victim = min(idle, key=lambda e: (e.handle in self._upcoming, e.tick))
            upcoming = victim.handle in self._upcoming
            last_resort = "; a later node needs it, but nothing else was idle" if upcoming else ""
            self._evict(victim, keep, f"{why} and {self._room_words(device)}{last_resort}")
            evicted = True
        if evicted:
            self.memory.release(device)

    def _evict(self, entry: _Entry, keep: frozenset[int], why: str = "") -> None:
        offload = self.offload_device
        if entry.device != offload:
            self._make_room(offload, entry.nbytes, keep | {id(entry)}, f"to offload {entry.handle.name}")
            if self.room(offload) >= entry.nbytes:
                self._note(f"offloaded {entry.handle.name} ({format_bytes(entry.nbytes)}) from {entry.device} to "
                           f"{offload} {why}".rstrip())
                self.memory.move(entry.module, offload)
                entry.device = offload
                self.stats["offloads"] += 1
                return
        self._note(f"unloaded {entry.handle.name} ({format_bytes(entry.nbytes)}) from {entry.device} {why}".rstrip())
        self._drop(entry, release=False)

    def _drop(self, entry: _Entry, *, release: bool = True) -> None:
        device = entry.device
        entry.module, entry.device = None, None
        self._entries.pop(entry.handle, None)
        self.stats["drops"] += 1
        if release and device is not None:
            self.memory.release(device)

    def _out_of_memory_message(self, what: str, exc: BaseException) -> str:
        request = self._request
        allocation = _ALLOCATION.search(str(exc))
        failed = ""
        if allocation:
            number, unit = allocation.groups()
            failed = f"; the allocation that failed was {format_bytes(float(number) * _UNITS[unit.lower()])}"
        if request is None:
            return f"out of memory in {what}, also after unloading every idle model and trying again{failed}"
        device, weights = request.device, request.handle.weight_bytes
        free = self.memory.free(device)
        budget = self.budget(device)
        within = f" (budget {format_bytes(budget)})" if budget is not None else ""
        return (f"out of memory on {device} in {what}, also after unloading every idle model and trying again: it "
                f"needed about {format_bytes(weights + request.working)} ({request.handle.name} "
                f"{format_bytes(weights)} + {format_bytes(request.working)} working memory){failed}, and "
                f"{format_bytes(free)} was free{within}. Use a smaller image or batch, a budget that fits "
                f"(--ram-budget/--vram-budget), or a precision with fewer bytes (--dtype)")


class _Streamer:
    """Runs a module whose weights live on `home` with its blocks moved to `device` one at a time.

    Units are the largest submodules of at most `limit` bytes (a bigger leaf is a unit of its own); a module too
    big to be a unit has its own parameters (not its children's) moved around its forward call.
    """

    def __init__(self, memory: DeviceMemory, module: Any, *, home: str, device: str, limit: int):
        self.memory, self.module, self.home, self.device, self.limit = memory, module, home, device, limit
        self._hooks: list[Any] = []

    def units(self) -> list[tuple[Any, bool]]:
        """(module, recurse) pairs covering every weight once."""
        found: list[tuple[Any, bool]] = []

        def visit(m: Any) -> None:
            children = list(m.children())
            if not children or module_bytes(m) <= self.limit:
                if module_bytes(m):
                    found.append((m, True))
                return
            if direct_bytes(m):
                found.append((m, False))
            for child in children:
                visit(child)

        visit(self.module)
        return found

    def __enter__(self) -> _Streamer:
        for unit, recurse in self.units():
            self._hooks.append(unit.register_forward_pre_hook(self._to(self.device, recurse)))
            self._hooks.append(unit.register_forward_hook(self._back(recurse), always_call=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.memory.move(self.module, self.home)

    def _to(self, device: str, recurse: bool) -> Callable[..., None]:
        def hook(module: Any, args: Any) -> None:
            self.memory.move(module, device, recurse=recurse)
        return hook

    def _back(self, recurse: bool) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            self.memory.move(module, self.home, recurse=recurse)
        return hook
