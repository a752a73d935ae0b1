"""List the copies, casts and concatenations of one HSTU layer's forward + backward on CPU (issue 16).

Runs one `gr_models.modules.hstu_layer.HSTULayer` forward and backward under torch.profiler (record_shapes,
with_stack) the way tools/bench_e2e.py runs a layer: float32 weights and residual stream under bf16 autocast
(`HSTUBlock` with `dtype="bfloat16"`), kernel backend TRITON (run by the Triton interpreter on CPU, so keep the
sizes tiny) or PYTORCH. Prints every aten::copy_ / aten::to / aten::_to_copy / aten::contiguous / aten::clone /
aten::cat call with its shapes, dtypes and the Python stack (or the autograd node, in backward) that made it,
then a count per op and the bytes each copy_ would move at NVIDIA's configuration (tools/bench_e2e.py "nvidia":
hidden 1024, 4 heads x 256, `--tokens` per step), scaled from the tiny run by the shapes' token dimension.

Copies made by the Triton interpreter itself (it copies every tensor argument back after a launch) are listed
apart: they do not happen on a GPU.

    .venv/bin/python tools/profile_hstu_layer_copies.py                 # triton backend under TRITON_INTERPRET=1
    .venv/bin/python tools/profile_hstu_layer_copies.py --backend pytorch --quiet
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass

if "--backend" not in sys.argv or "triton" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports a Triton kernel

import torch
from torch.profiler import ProfilerActivity, profile

from gr_models.configs import get_hstu_config
from gr_models.modules.hstu_layer import HSTULayer
from gr_models.modules.preprocessing import HSTUSequence

OPS = ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::cat")
_ITEM_SIZE = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4}
# tools/bench_e2e.py "nvidia": hidden 1024, 4 heads x 256; about 98K tokens per step (3-step profile), 8 layers
_OWN_FRAMES = ("gr_models/", "hstu_attn/", "triton/runtime/interpreter.py", "torch/autocast", "torch/amp")
_CPU_INTERNAL_PARENTS = ("aten::addmm", "aten::add", "aten::add_", "aten::mul", "aten::div", "aten::div_")
HIDDEN, HEADS, HEAD_DIM = 48, 2, 32  # tiny sizes, all distinct from each other and from the token count
NVIDIA = {"hidden": 1024, "heads": 4, "head_dim": 256, "tokens": 98_000, "layers": 8}


@dataclass
class Call:
    """One profiled op: name, input shapes and dtypes, and where it came from (Python frames or autograd node)."""

    name: str
    shapes: list
    dtypes: list
    origin: list[str]
    enclosing_ops: list[str]  # the aten ops this call runs inside, innermost first

    @property
    def interpreter(self) -> bool:
        return any("triton/runtime/interpreter.py" in frame for frame in self.origin)

    @property
    def cpu_internal(self) -> bool:
        """Made inside an arithmetic op: CPU addmm copies its bias into the output, CPU binary ops cast
        mixed-dtype inputs (and scalars) to temporaries; their CUDA kernels do neither. (Autocast's weight casts,
        inside aten::linear, happen on CUDA too.)"""
        outer = [op for op in self.enclosing_ops if op not in OPS]
        return bool(outer) and outer[0] in _CPU_INTERNAL_PARENTS


def _sequence(lengths: list[int], targets: list[int]) -> HSTUSequence:
    return HSTUSequence.for_layers(lengths, targets)


def _origin(parents: list[str]) -> list[str]:
    """The innermost enclosing aten op (if any), then the repository's Python frames among `parents` (innermost
    first), behind the autograd node if any."""
    frames = [f"in {parents[0]}"] if parents and parents[0].startswith("aten::") else []
    for name in parents:
        if name.startswith("autograd::engine::evaluate_function"):
            return [name.split(": ", 1)[-1], *frames]
        if ".py(" in name and any(part in name for part in _OWN_FRAMES):
            frames.append(name)
    return frames


def profile_layer(backend: str, lengths: list[int], targets: list[int], hidden: int, heads: int, head_dim: int):
    """Profile one forward + backward; returns the `Call`s of `OPS` in time order."""
    torch.manual_seed(0)
    config = get_hstu_config(hidden, head_dim, heads, 1, dtype="bfloat16", kernel_backend=backend, dropout=0.1)
    layer = HSTULayer(config)
    x = torch.randn(sum(lengths), hidden, requires_grad=True)
    sequence = _sequence(lengths, targets)
    grad = torch.randn(sum(lengths), hidden)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x, sequence)
        out.backward(grad)  # no loss ops: only the layer's backward is profiled
    return _calls(prof.profiler.kineto_results.events())


def _calls(events) -> list[Call]:
    """The `OPS` events with their enclosing events (found by time nesting per thread) as origin.

    Reads the raw kineto events: `prof.events()` fails on the undecodable frame names that the Triton
    interpreter's Python frames can produce."""
    named = []
    for event in events:
        try:
            named.append((event.start_ns(), -event.end_ns(), event.name(), event))
        except UnicodeDecodeError:
            continue
    named.sort(key=lambda item: item[:2])
    open_events: dict[int, list] = {}
    calls = []
    for start, neg_end, name, event in named:
        stack = open_events.setdefault(event.start_thread_id(), [])
        while stack and stack[-1][0] <= start:
            stack.pop()
        if name in OPS:  # nested ones too (aten::to -> aten::_to_copy -> aten::copy_)
            parents = [n for _, n in reversed(stack)]
            ops = [n for n in parents if n.startswith("aten::")]
            calls.append(Call(name, event.shapes(), event.dtypes(), _origin(parents), ops))
        stack.append((-neg_end, name))
    return calls


def copy_bytes(call: Call, dim_map: dict[int, int]) -> int:
    """Bytes read + written by a copy_ call, each dimension mapped by `dim_map` (tiny size -> nvidia size)."""
    total = 0
    for shape, dtype in zip(call.shapes[:2], call.dtypes[:2]):
        numel = 1
        for size in shape:
            numel *= dim_map.get(size, size)
        total += numel * _ITEM_SIZE.get(dtype, 4)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("triton", "pytorch"), default="triton")
    parser.add_argument("--quiet", action="store_true", help="print only the counts")
    args = parser.parse_args()
    lengths, targets = [7, 13, 1, 4], [2, 3, 0, 1]  # 25 tokens: odd lengths, targets
    calls = profile_layer(args.backend, lengths, targets, hidden=HIDDEN, heads=HEADS, head_dim=HEAD_DIM)
    tokens = sum(lengths)
    real = [c for c in calls if not c.interpreter]
    if not args.quiet:
        for call in calls:
            tag = " [interpreter]" if call.interpreter else " [CPU-internal]" if call.cpu_internal else ""
            print(f"{call.name}{tag} shapes={call.shapes} dtypes={call.dtypes}")
            for frame in call.origin[:6]:
                print(f"    {frame}")
    print(f"\nbackend={args.backend}, {tokens} tokens, one layer forward + backward (bf16 autocast):")
    for name, count in Counter(c.name for c in real).items():
        print(f"  {name}: {count}")
    print(f"  (+ {len(calls) - len(real)} calls made by the Triton interpreter only)")
    copies = [c for c in real if c.name == "aten::copy_"]
    device_copies = [c for c in copies if not c.cpu_internal]
    print(
        f"  copy_ calls that a CUDA run also makes: {len(device_copies)} "
        f"({len(copies) - len(device_copies)} more are CPU-internal: addmm bias, mixed-dtype add, scalars)"
    )
    _nvidia_estimate(device_copies, tokens)


def _nvidia_estimate(copies: list[Call], tokens: int) -> None:
    """Bytes moved by the copies at the nvidia config: each tiny dimension (tokens, hidden, H, D and the widths
    H*D, 2H*D, 4H*D; all distinct here) mapped to its nvidia size."""
    width, nv_width = HEADS * HEAD_DIM, NVIDIA["heads"] * NVIDIA["head_dim"]
    dim_map = {
        tokens: NVIDIA["tokens"],
        HIDDEN: NVIDIA["hidden"],
        HEADS: NVIDIA["heads"],
        HEAD_DIM: NVIDIA["head_dim"],
        **{m * width: m * nv_width for m in (1, 2, 3, 4)},
    }
    per_layer = sum(copy_bytes(c, dim_map) for c in copies)
    step = per_layer * NVIDIA["layers"]
    print(
        f"  their bytes (read + write) at the nvidia config (~{NVIDIA['tokens']} tokens/step): "
        f"{per_layer / 2**20:.0f} MiB per layer, {step / 2**30:.2f} GiB per step ({NVIDIA['layers']} layers), "
        f"about {step / 3e12 * 1e3:.1f} ms at 3 TB/s"
    )


if __name__ == "__main__":
    main()
