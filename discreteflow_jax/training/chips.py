"""TPU chips and slices: the one table of per-chip HBM and peak bf16 throughput, the topology of
an accelerator type, and the step-time / chip-hour estimate from FLOPs.

Sources (per chip, as published in the Cloud TPU documentation, "System architecture" pages
for each generation: cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e):
  v4:  32 GiB HBM2,  275 TFLOP/s bf16 (2 TensorCores, used as one "megacore" device)
  v5e: 16 GiB HBM2,  197 TFLOP/s bf16 (1 TensorCore)
  v5p: 95 GiB HBM2e, 459 TFLOP/s bf16 (2 TensorCores, megacore)
  v6e: 32 GiB HBM,   918 TFLOP/s bf16 (1 TensorCore)
The compiler keeps part of the HBM for itself (on a v5e it allows 15.75 of the 16 GiB), so a
program reported within a few percent of the total is at the edge.
"""

from __future__ import annotations

import dataclasses
import re

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str
    hbm_gib: float
    peak_bf16_tflops: float
    megacore: bool  # two TensorCores presented as one device (JAX meshes need one device per chip)
    accelerator_prefix: str  # --accelerator-type of `gcloud compute tpus tpu-vm create`
    device_kinds: tuple[str, ...]  # jax's device.device_kind for it (substrings; specific first)


# Ordered so that matching device kinds as substrings finds "TPU v5 lite" before "TPU v5".
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32.0, 275.0, True, "v4", ("TPU v4",)),
    "v5e": Chip("v5e", 16.0, 197.0, False, "v5litepod", ("TPU v5 lite", "TPU v5e")),
    "v5p": Chip("v5p", 95.0, 459.0, True, "v5p", ("TPU v5p", "TPU v5")),
    "v6e": Chip("v6e", 32.0, 918.0, False, "v6e", ("TPU v6 lite", "TPU v6e")),
}

# Chips -> topology of the common slice sizes: 3-D tori for v4/v5p, 2-D for v5e/v6e.
_TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}
_TORUS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Slice:
    chip: Chip
    topology: str  # e.g. "v5e:2x4", as jax.experimental.topologies takes it
    chips: int

    @property
    def accelerator_type(self) -> str:
        """The gcloud name: cores for v4/v5p (two per chip), chips for v5e/v6e."""
        count = self.chips * (2 if self.chip.megacore else 1)
        return f"{self.chip.accelerator_prefix}-{count}"


def parse_slice(text: str) -> Slice:
    """A slice from a topology ("v5e:2x4", "v4:2x2x1") or an accelerator type ("v5litepod-8",
    "v5e-8", "v4-8", "v5p-8", "v6e-8"); ValueError with the valid forms otherwise."""
    text = text.strip().lower()
    if m := re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", text):
        gen, dims = m.group(1), m.group(2)
        chips = 1
        for d in dims.split("x"):
            chips *= int(d)
        want = 3 if CHIPS[gen].megacore else 2
        if len(dims.split("x")) != want:
            raise ValueError(f"topology {text!r}: {gen} slices have {want} dimensions (e.g. "
                             f"{gen}:{'2x2x1' if want == 3 else '2x4'})")
        return Slice(CHIPS[gen], text, chips)
    if m := re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text):
        gen = "v5e" if m.group(1) == "v5litepod" else m.group(1)
        chip, count = CHIPS[gen], int(m.group(2))
        chips = count // 2 if chip.megacore else count
        table = _TORUS_3D if chip.megacore else _TORUS_2D
        if chips not in table or (chip.megacore and count % 2):
            raise ValueError(f"no known topology for {text!r}; pass one explicitly, e.g. --topology={gen}:"
                             f"{'2x2x2' if chip.megacore else '4x4'}")
        return Slice(chip, f"{gen}:{table[chips]}", chips)
    raise ValueError(f"unknown TPU slice {text!r}; use a topology such as v5e:2x4, v4:2x2x1, v5p:2x2x1, "
                     "v6e:2x4, or an accelerator type such as v5litepod-8, v4-8")


def step_seconds(flops_per_device: float, chip: Chip, mfu: float) -> float:
    """Time of a step that does ``flops_per_device`` on each chip at ``mfu`` of the bf16 peak."""
    return flops_per_device / (chip.peak_bf16_tflops * 1e12 * mfu)


def chip_hours(seconds_per_step: float, steps: int, chips: int) -> float:
    return seconds_per_step * steps * chips / 3600.0
