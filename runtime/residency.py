"""Which idle models stay resident while a run goes on: decided per model from the plan and the process's peak.

The manager (runtime/models.py) asks this before it places a model inside a run (`ModelManager.run_node`), when
the run's look-ahead says which models the nodes still to run will use. The rule:

- The process's **peak** is the largest footprint (weights held on the device + one call's working memory) it
  has already needed. Keeping an idle model costs nothing as long as the new request still fits under that peak:
  the process has been that big already.
- When a request would raise the peak, idle models that no remaining node of this run uses and that are **cheap
  to reload** (`ModelHandle.cheap_reload`: text encoders, whose outputs the nodes cache and which are read again
  by a plain copy out of the memory-mapped file) are dropped, largest first, until it no longer does. Models
  under WORTH_DROPPING stay: what dropping them saves is lost in the allocator's slack. For a
  full-size SD1.5 txt2img this drops the text encoder before the VAE decode: 3.50 -> ~2.9 GB peak RSS.
- Models that are expensive to reload (a UNet is read and its convolutions repacked for oneDNN) stay resident
  for the next prompt while the budget allows them (the budget itself is enforced by the manager's eviction).
- Unless there is **no next prompt**: a process that runs one graph and exits (`sdgraph run` without --sweep)
  has nothing to keep a model for once no remaining node uses it, so expensive models unused later are dropped
  too (after the cheap ones) rather than raise the peak. A 512² SD1.5 txt2img then decodes without the UNet
  beside it, as `--unload` does, but only when keeping it would have raised the peak.
- Only in RAM (the offload device): the peak that matters there is the process's RSS. On an accelerator the
  manager offloads to RAM under the VRAM budget, as before, and a text encoder stays on the GPU if it fits.

Pure functions over plain values; no torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .memory import MiB, format_bytes

WORTH_DROPPING = 64 * MiB  # a smaller model is kept: what dropping it saves is within the allocator's slack


@dataclass(frozen=True)
class Resident:
    """An idle model on the device being placed on, as the rule sees it."""

    key: Any = field(compare=False)  # what the caller identifies it by (the manager's entry)
    name: str
    nbytes: int
    needed_later: bool  # a node still to run in this run uses it
    cheap_reload: bool


@dataclass(frozen=True)
class Verdict:
    drop: tuple[tuple[Resident, str], ...]  # (model, why) dropped before the request
    keep: tuple[tuple[Resident, str], ...]  # (model, why) kept, unused by the rest of the run, raising the peak


def hold_peak(idle: Iterable[Resident], footprint: int, peak: int, *, who: str,
              next_prompt: bool = True) -> Verdict:
    """What to drop so that a request whose footprint (held weights + its own weights and working memory) is
    `footprint` stays under the process's `peak`, and what is kept anyway, each with why (for `--explain`).
    `who` says what the request is ("UNet of a.safetensors takes 2.1 GB ..."); `next_prompt` is False when the
    process runs no other prompt after this one, so nothing is worth keeping for it."""
    idle = list(idle)
    if footprint <= peak:
        return Verdict((), ())
    unused = [r for r in idle if not r.needed_later and r.nbytes >= WORTH_DROPPING]
    spare = sorted((r for r in unused if r.cheap_reload), key=lambda r: -r.nbytes)
    if not next_prompt:
        spare += sorted((r for r in unused if not r.cheap_reload), key=lambda r: -r.nbytes)
    drop = []
    for resident in spare:
        if footprint <= peak:
            break
        reason = ("it is cheap to read again from its file" if resident.cheap_reload else
                  "this process runs no other prompt to keep it for")
        drop.append((resident, (
            f"dropped {resident.name} ({format_bytes(resident.nbytes)}): no later node of this run uses it, "
            f"{reason}, and keeping it while {who} would raise the process's peak to "
            f"{format_bytes(footprint)} (it has needed {format_bytes(peak)} so far)")))
        footprint -= resident.nbytes
    # Kept for the next prompt: the expensive models the rule does not drop (with no next prompt, none is kept)
    kept = [r for r in idle if not r.cheap_reload and not r.needed_later] if footprint > peak and next_prompt else []
    return Verdict(tuple(drop), tuple((r, _kept_because(r, who, footprint)) for r in kept))


def _kept_because(resident: Resident, who: str, footprint: int) -> str:
    return (f"kept {resident.name} ({format_bytes(resident.nbytes)}) although no later node of this run uses it "
            f"and keeping it while {who} raises the process's peak to {format_bytes(footprint)}: reloading it is "
            f"expensive (read again and repacked), so it stays for the next prompt while the budget allows")
