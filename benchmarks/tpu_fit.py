"""The fit table of docs/scale.md: every GPT-2 preset x TPU topology x remat policy x mesh, compiled with
`python -m jaxgpt.aot --max_batch` (one process a row, a JSON a row; rows already in OUT are skipped, so an
interrupted run continues), then rendered as markdown.

    TPU_SKIP_MDS_QUERY=1 /work/venv-tpu/bin/python benchmarks/tpu_fit.py run [--only 1.5B v5e-16] \
        [--skip fsdp_full] [--shard 0/2]   # and --shard 1/2 beside it: one XLA compile keeps one core busy
    python benchmarks/tpu_fit.py table [--only ...] [--skip ...] > table.md
    python benchmarks/tpu_fit.py plot --png docs/figures/tpu_fit.png
    python benchmarks/tpu_fit.py docs   # every table of docs/scale.md between `tpu_fit table` markers

The rows land in docs/figures/tpu_fit/ (`--out`), one JSON a row, kept with the docs they back.

Each row is a train step at seq 1024, bf16 compute with float32 master weights and AdamW state, scanned layers,
no gradient accumulation. `--max_batch` compiles 2-6 times a row (2 when a row does not fit at all).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = REPO / "docs" / "figures" / "tpu_fit"  # a JSON a row, beside the docs that show them
DOC = REPO / "docs" / "scale.md"  # its tables: `refresh`
PRESETS = {"124M": (12, 12, 768), "355M": (24, 16, 1024), "774M": (36, 20, 1280), "1.5B": (48, 25, 1600)}
# name -> (topology, devices); v4's topology lists each of a chip's two cores as a device
TOPOLOGIES = {"v5e-16": ("v5e:4x4", 16), "v5p-8": ("v5p:2x2x1", 4), "v6e-8": ("v6e:2x4", 8),
              "v4-8": ("v4:2x2x1", 8), "v5e-64": ("v5e:8x8", 64)}
REMATS = ("full", "dots_saveable", "none")
MESHES = ("fsdp", "dp")
START = {"124M": 8, "355M": 4, "774M": 4, "1.5B": 2}  # the first batch --max_batch compiles


def rows() -> list[tuple[str, str, str, str]]:
    """(preset, topology, remat, mesh), most informative first: FSDP with full remat everywhere, then the rest."""
    first = [(p, t, "full", "fsdp") for t in TOPOLOGIES for p in PRESETS]
    rest = [(p, t, r, m) for t in TOPOLOGIES for m in MESHES for r in REMATS for p in PRESETS]
    return first + [r for r in rest if r not in first]


def row_name(preset: str, topo: str, remat: str, mesh: str) -> str:
    return f"{preset}_{topo}_{mesh}_{remat}"


def _train_reports(f: Path) -> list[dict]:
    return sorted((r for r in json.loads(f.read_text()).get("reports", []) if r["step"] == "train"),
                  key=lambda r: r["batch_per_chip"])


def guess(out: Path, preset: str, topo: str, remat: str, mesh: str) -> int | None:
    """The largest batch the row is likely to hold, from a finished row of the same model, remat and mesh kind
    on another topology: bytes at no rows (params, optimizer state, their gradients) split over the new FSDP
    size, the same bytes a row, the chip's HBM (from any finished row on that chip). None: nothing to go by."""
    chip = TOPOLOGIES[topo][0].split(":")[0]  # v5e-64 has v5e-16's chips
    same_chip = [t for t, (name, _) in TOPOLOGIES.items() if name.split(":")[0] == chip]
    hbm = next((r["hbm"] for t in same_chip for f in sorted(out.glob(f"*_{t}_*.json")) for r in _train_reports(f)),
               None)
    for other in TOPOLOGIES:
        f = out / f"{row_name(preset, other, remat, mesh)}.json"
        if other == topo or hbm is None or not f.exists():
            continue
        reports = [r for r in _train_reports(f) if r.get("used") is None]  # full reports: exact bytes
        if len(reports) < 2:
            continue
        a, b = reports[-2:]
        per_row = (b["total"] - a["total"]) / (b["batch_per_chip"] - a["batch_per_chip"])
        shards = (TOPOLOGIES[other][1] / TOPOLOGIES[topo][1]) if mesh == "fsdp" else 1.0
        fixed = (b["total"] - b["batch_per_chip"] * per_row) * shards
        return max(1, int((hbm - fixed) / per_row)) if per_row > 0 else None
    return None


def aot_args(preset: str, topo: str, remat: str, mesh: str, start: int | None = None) -> list[str]:
    """aot's flags for a row; `start`: a guess of the answer (--near), else the preset's small START."""
    L, H, C = PRESETS[preset]
    name, n = TOPOLOGIES[topo]
    data, fsdp = (n, 1) if mesh == "dp" else (1, n)
    first = [f"--batch_per_chip={start}", "--near"] if start else [f"--batch_per_chip={START[preset]}"]
    return [f"--config={REPO}/configs/gpt2_124m.py", f"--topology={name}", f"--config.model.n_layer={L}",
            f"--config.model.n_head={H}", f"--config.model.n_embd={C}", f"--config.mesh.data={data}",
            f"--config.mesh.fsdp={fsdp}", f"--config.model.remat={remat}", "--config.model.scan_layers=True",
            "--config.grad_accum=1", *first, "--max_batch", "--decode=False"]


def wanted(name: str, only: Sequence[str] = (), skip: Sequence[str] = ()) -> bool:
    """A row whose name holds all of `only` and none of `skip`."""
    return all(o in name for o in only) and not any(s in name for s in skip)


def run(out: Path, only: Sequence[str], shard: str = "0/1", skip: Sequence[str] = ()) -> None:
    """Every row not yet in `out` (rows whose name holds all of `only` and none of `skip`); shard "i/n" takes
    every n-th row from the i-th, so n runners (XLA compiles on one core) share the grid. aot's output goes to
    out/logs/ROW.log, the report to out/ROW.json."""
    i, n = (int(v) for v in shard.split("/"))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # runners side by side
    env.pop("JAX_PLATFORMS", None)
    for k, row in enumerate(rows()):
        name = row_name(*row)
        if k % n != i or (out / f"{name}.json").exists() or not wanted(name, only, skip):
            continue
        t0 = time.time()
        with open(out / "logs" / f"{name}.log", "w") as log:
            args = aot_args(*row, start=guess(out, *row))
            rc = subprocess.run([sys.executable, "-m", "jaxgpt.aot", *args, f"--json={out / name}.json"],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"{name}: exit {rc} in {time.time() - t0:.0f} s", flush=True)


def table(out: Path, only: Sequence[str] = (), skip: Sequence[str] = ()) -> str:
    """One markdown line a finished row (of those `wanted`): the largest batch a chip holds, the GiB a chip needs
    at it, and every batch compiled on the way (the evidence: the largest that fits, and the one above it that
    does not)."""
    gib = 2**30
    lines = ["| model | topology | mesh | remat | largest batch/chip | GiB/chip at it (usable) | GiB/row there | "
             "model TFLOPs/step at it | compiled batches (GiB/chip) |", "|---|---|---|---|---:|---:|---:|---:|---|"]
    for row in rows():
        f = out / f"{row_name(*row)}.json"
        if not f.exists() or not wanted(row_name(*row), only, skip):
            continue
        reports = _train_reports(f)
        fitting = [r for r in reports if r["fits"]]
        best = fitting[-1] if fitting else None
        above = [r for r in reports if best and r["batch_per_chip"] > best["batch_per_chip"]]
        # the slope where the row ran out (its best batch and the next compiled); else between the first two
        a, b = ([best] + above + reports)[:2] if best else (reports * 2)[:2]
        per_row = (b["total"] - a["total"]) / max(b["batch_per_chip"] - a["batch_per_chip"], 1) / gib
        per_row_s = "-" if a is b else f"{per_row:.3f}"  # one batch compiled: no slope
        tried = ", ".join(f"{r['batch_per_chip']} ({r['total'] / gib:.2f})" for r in reports)
        preset, topo, remat, mesh = row
        mesh_s = f"fsdp {TOPOLOGIES[topo][1]}" if mesh == "fsdp" else f"data {TOPOLOGIES[topo][1]}"
        if best is None:
            lines.append(f"| {preset} | {topo} | {mesh_s} | {remat} | 0 (does not fit) | "
                         f"{a['total'] / gib:.2f} at {a['batch_per_chip']} ({a['hbm'] / gib:.2f}) | {per_row_s} | - | "
                         f"{tried} |")
            continue
        tflops = f"{best['model_flops'] / 1e12:.0f}"  # aot's count: jaxgpt.train.metrics.flops_per_token
        lines.append(f"| {preset} | {topo} | {mesh_s} | {remat} | {best['batch_per_chip']} | "
                     f"{best['total'] / gib:.2f} ({best['hbm'] / gib:.2f}) | {per_row_s} | {tflops} | {tried} |")
    return "\n".join(lines)


# A table in a markdown file, between these two lines, is `table(out, only, skip)` with the flags the lines name.
_MARKED = re.compile(r"(<!-- tpu_fit table(?P<flags>[^:]*): begin -->\n).*?(\n<!-- tpu_fit table(?P=flags): end -->)",
                     re.S)


def _filters(flags: str) -> tuple[list[str], list[str]]:
    """A marker's flags as filters: ' --only a b --skip c' -> (["a", "b"], ["c"])."""
    found: dict[str, list[str]] = {"--only": [], "--skip": []}
    key = None
    for word in flags.split():
        if word in found:
            key = word
        elif key is None:
            raise ValueError(f"tpu_fit table marker: {word!r} is not after --only or --skip")
        else:
            found[key].append(word)
    return found["--only"], found["--skip"]


def refresh(text: str, out: Path) -> str:
    """`text` with every marked table regenerated from the rows in `out`."""
    def one(m: re.Match) -> str:
        return m.group(1) + table(out, *_filters(m.group("flags"))) + m.group(3)
    return _MARKED.sub(one, text)


def largest(out: Path, only: Sequence[str] = (), skip: Sequence[str] = ()) -> dict[tuple[str, str, str, str], int]:
    """(preset, topology, remat, mesh) -> the largest batch a chip holds, for every finished row `wanted`."""
    found = {}
    for row in rows():
        f = out / f"{row_name(*row)}.json"
        if f.exists() and wanted(row_name(*row), only, skip):
            fitting = [r["batch_per_chip"] for r in _train_reports(f) if r["fits"]]
            found[row] = max(fitting, default=0)
    return found


def plot(out: Path, png: Path, only: Sequence[str] = (), skip: Sequence[str] = ()) -> None:
    """Bars of the largest batch a chip holds: a panel per mesh and remat policy, topologies along x, a bar per
    model; a row not measured has no bar, a row that does not fit a 0 marked with x."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = largest(out, only, skip)
    panels = [(m, r) for m in MESHES for r in REMATS if any(k[2:] == (r, m) for k in found)]
    ncols = max(min(len(panels), len(REMATS)), 1)
    nrows = max(-(-len(panels) // ncols), 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    width = 0.8 / len(PRESETS)
    for ax, (mesh, remat) in zip(axes.flat, panels):
        for j, preset in enumerate(PRESETS):
            for i, topo in enumerate(TOPOLOGIES):
                best = found.get((preset, topo, remat, mesh))
                if best is None:
                    continue
                x = i + (j - (len(PRESETS) - 1) / 2) * width
                ax.bar(x, max(best, 0.5), width, color=f"C{j}", label=preset if i == 0 or best else None)
                ax.text(x, max(best, 0.5), "x" if best == 0 else str(best), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(TOPOLOGIES)), list(TOPOLOGIES))
        ax.set_yscale("log")
        ax.set_ylim(0.5, 2 * max(found.values(), default=1))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_title(f"{'FSDP' if mesh == 'fsdp' else 'data parallel'}, remat {remat}")
        ax.set_ylabel("largest batch per chip (seq 1024)")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8)
    fig.suptitle("GPT-2 train step compiled for TPU topologies (bf16, AdamW)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("run", "table", "plot", "docs"))
    ap.add_argument("--out", type=Path, default=ROWS,
                    help="a JSON a row (the measurements docs/scale.md shows)")
    ap.add_argument("--only", nargs="*", default=[], help="only rows whose name holds all of these")
    ap.add_argument("--skip", nargs="*", default=[], help="leave out rows whose name holds any of these")
    ap.add_argument("--png", type=Path, default=Path("tpu_fit.png"), help="plot: the figure to write")
    ap.add_argument("--shard", default="0/1", help="i/n: this runner's share of the rows (run n at once)")
    args = ap.parse_args()
    if args.what == "run":
        run(args.out, args.only, args.shard, args.skip)
    elif args.what == "plot":
        plot(args.out, args.png, args.only, args.skip)
    elif args.what == "docs":
        from jaxgpt.io.atomic import write_text

        write_text(DOC, refresh(DOC.read_text(), args.out))
    else:
        print(table(args.out, args.only, args.skip))


if __name__ == "__main__":
    main()
