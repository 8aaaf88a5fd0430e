"""The results side of ``bench_e2e.py``: its rows and everything made from them.

``Row`` (one model x variant; its fields are the CSV's columns, in order), the CSV read back,
appended to and checked before a run appends to it, the Markdown table with its header and
notes, the PNG charts (if matplotlib is importable) and ``latest_runs``, which merges the rows
of several commands for ``--table-from``.  Nothing here measures or imports torch:
``bench_e2e.py`` imports this module, never the reverse.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Optional

VARIANTS = ("eager", "inductor", "sdpa_inductor", "fusepass")
MODES = ("infer", "train")


# ---------------------------------------------------------------------------------------------
# Rows


@dataclasses.dataclass
class Row:
    """One model x variant: what goes to the CSV (columns in this order)."""

    run: str  # UTC start of the run that made the row (a run's rows share it)
    date: str
    device: str
    torch: str
    triton: str
    transformers: str
    command: str
    model: str
    config: str
    variant: str
    dtype: str
    batch: int
    seq: int
    dec_seq: int  # T5 and Whisper only
    layers: int
    attention_layers: int  # attention sites per forward, from the config
    compiler: str  # what inductor / sdpa_inductor compile with, and fusepass's inner compiler
    autotune: Optional[bool] = None  # fusepass: kernel configs timed on the GPU
    weights_gib: Optional[float] = None
    infer_ms: Optional[float] = None
    train_ms: Optional[float] = None
    infer_peak_gib: Optional[float] = None
    train_peak_gib: Optional[float] = None
    fused_infer: Optional[int] = None
    rejected_infer: Optional[int] = None
    fused_train: Optional[int] = None
    rejected_train: Optional[int] = None
    eager_frames: Optional[int] = None  # frames Dynamo gave up on (ran eagerly) in this variant's compiles
    first_infer_s: Optional[float] = None  # fresh process: torch.compile + first call (fusepass: cold cache)
    first_train_s: Optional[float] = None
    first_infer_warm_s: Optional[float] = None  # fusepass with the tuning cache the cold run filled
    first_train_warm_s: Optional[float] = None
    tuned_keys_infer: Optional[int] = None  # fusepass cold run: keys tuned, seconds spent tuning
    tuned_keys_train: Optional[int] = None
    tuning_infer_s: Optional[float] = None
    tuning_train_s: Optional[float] = None
    correct: Optional[bool] = None  # fusepass row: every check below passed
    out_err: Optional[float] = None  # max |fusepass - fp64| of the inference output that is worst against its bound
    out_eager_err: Optional[float] = None  # eager's for that output
    loss_terms_err: Optional[float] = None  # per-token loss terms of the first training step
    loss_terms_eager_err: Optional[float] = None
    grad_param: str = ""
    grad_err: Optional[float] = None
    grad_eager_err: Optional[float] = None
    loss: Optional[float] = None  # the scalar losses: fusepass, eager, float64
    loss_eager: Optional[float] = None
    loss_fp64: Optional[float] = None
    seconds: Optional[float] = None  # wall time of this variant's in-process part (compiles included)
    note: str = ""
    error: str = ""

    def add_note(self, text: str) -> None:
        if text not in self.note.split("; "):
            self.note = f"{self.note}; {text}" if self.note else text

    def add_error(self, where: str, e: BaseException) -> None:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        text = f"{where}: {type(e).__name__}: {first}"[:300]
        self.error = f"{self.error}; {text}" if self.error else text


COLUMNS = [f.name for f in dataclasses.fields(Row)]


def _parse_cell(kind: str, text: str):
    """A CSV cell back to the field's type (``kind``: the annotation as text)."""
    if kind == "str":
        return text
    if text == "":
        return None
    if "bool" in kind:
        return text == "True"
    if "int" in kind:
        return int(text)
    return float(text)


def read_csv(path: str) -> list[Row]:
    kinds = {f.name: str(f.type) for f in dataclasses.fields(Row)}
    with open(path, newline="") as f:
        return [Row(**{k: _parse_cell(kinds[k], v) for k, v in rec.items() if k in kinds}) for rec in csv.DictReader(f)]


def append_csv(path: str, rows: list[Row]) -> None:
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in dataclasses.asdict(r).items()})


def check_csv_header(path: str) -> None:
    """Before measuring: a CSV with other columns would be corrupted by appending."""
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:
            raise SystemExit(f"{path} has other columns than this script writes; pass another --csv")


# ---------------------------------------------------------------------------------------------
# Table and charts


def _f(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ratio(num, den, suffix="x") -> str:
    return f"{num / den:.2f}{suffix}" if num and den else "-"


def _by_model(rows: list[Row]) -> dict[str, dict[str, Row]]:
    out: dict[str, dict[str, Row]] = {}
    for r in rows:
        out.setdefault(r.model, {})[r.variant] = r
    return out


def table(rows: list[Row]) -> str:
    lines = [
        "| model | fused / layers (inference, training) | inference ms: eager / inductor / SDPA+ind. / fusepass "
        "| inference speed-up vs SDPA+ind. | training step ms: eager / inductor / SDPA+ind. / fusepass "
        "| training speed-up vs SDPA+ind. | peak GiB inference: SDPA+ind. / fusepass (ratio) "
        "| peak GiB training: SDPA+ind. / fusepass (ratio) "
        "| first call s, inference: inductor / SDPA+ind. / fusepass cold / warm "
        "| first call s, training: inductor / SDPA+ind. / fusepass cold / warm | matches fp64 rule |",
        "|---" * 11 + "|",
    ]
    for model, v in _by_model(rows).items():
        e, i, s, f = (v.get(k) for k in VARIANTS)

        def col(r, attr, digits=2):
            return _f(getattr(r, attr) if r else None, digits)

        sd_mark = ""
        if s and "softcap off" in s.note:
            sd_mark = " (softcap off)"
        if s and "no compile" in s.note:
            sd_mark += " (no compile)"
        fused = "-"
        if f:
            fused = ", ".join("-" if n is None else f"{n}/{f.attention_layers}" for n in (f.fused_infer, f.fused_train))
            if f.rejected_infer or f.rejected_train:
                fused += f" ({f.rejected_infer or 0}, {f.rejected_train or 0} rejected)"
        cells = [model, fused]
        for mode in MODES:
            ms = [col(r, f"{mode}_ms") for r in (e, i, s, f)]
            ms[2] += sd_mark if ms[2] != "-" else ""
            cells += [" / ".join(ms), _ratio(getattr(s, f"{mode}_ms") if s else None,
                                             getattr(f, f"{mode}_ms") if f else None)]
        for mode in MODES:
            ps, pf = (getattr(r, f"{mode}_peak_gib") if r else None for r in (s, f))
            cells.append(f"{_f(ps)} / {_f(pf)} ({_ratio(pf, ps, '')})" if ps or pf else "-")
        for mode in MODES:
            firsts = [col(i, f"first_{mode}_s", 1), col(s, f"first_{mode}_s", 1), col(f, f"first_{mode}_s", 1),
                      col(f, f"first_{mode}_warm_s", 1)]
            cells.append(" / ".join(firsts) if any(x != "-" for x in firsts) else "-")
        cells.append("-" if not f or f.correct is None else ("yes" if f.correct else "**NO**"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(rows: list[Row]) -> str:
    out = []
    for model, v in _by_model(rows).items():
        any_row = next(iter(v.values()))
        text = f"- {model}: {any_row.config}"
        f = v.get("fusepass")
        if f and f.out_err is not None:
            text += (f"; max error vs float64, fusepass / eager: output {f.out_err:.2e} / {f.out_eager_err:.2e}, "
                     f"per-token loss {f.loss_terms_err:.2e} / {f.loss_terms_eager_err:.2e}")
            if f.grad_err is not None:
                text += f", grad of {f.grad_param} {f.grad_err:.2e} / {f.grad_eager_err:.2e}"
            text += f"; loss fusepass / eager / float64 {f.loss:.6g} / {f.loss_eager:.6g} / {f.loss_fp64:.6g}"
        if f and f.tuned_keys_infer is not None:
            text += (f"; cold tuning: {f.tuned_keys_infer} keys {f.tuning_infer_s} s (inference), "
                     f"{f.tuned_keys_train} keys {f.tuning_train_s} s (training)")
        out.append(text)
        for variant, r in v.items():
            if r.note:
                out.append(f"  - {variant}: {r.note}")
            if r.error:
                out.append(f"  - {variant} FAILED: {r.error}")
    return "\n".join(out)


def header(rows: list[Row]) -> str:
    r = rows[0]
    commands = dict.fromkeys(c for x in rows for c in x.command.split(" && "))
    return (f"{r.device}, torch {r.torch}, triton {r.triton}, transformers {r.transformers}, {r.date}; "
            f"{r.dtype}, B={r.batch}, S={r.seq} (T5/Whisper decoder {r.dec_seq}), {r.layers} layers; "
            f"compiler {r.compiler}, fusepass autotune {'on' if any(x.autotune for x in rows) else 'off'}; "
            f"median ms.  Command(s):\n\n" + "".join(f"    {c}\n" for c in commands))


def charts(rows: list[Row], folder: str) -> list[str]:
    """speedup.png (fusepass over SDPA + Inductor, inference and training, per model) and
    train_memory.png (peak training GiB per model and variant), if matplotlib is importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: charts skipped", flush=True)
        return []
    os.makedirs(folder, exist_ok=True)
    by = _by_model(rows)
    models = list(by)
    written = []

    def bars(ax, series: dict[str, list], width_total=0.8):
        width = width_total / max(1, len(series))
        for k, (label, values) in enumerate(series.items()):
            xs = [x - width_total / 2 + width * (k + 0.5) for x in range(len(models))]
            ax.bar(xs, [math.nan if v is None else v for v in values], width, label=label)
        ax.set_xticks(range(len(models)), models)
        ax.legend()

    speed = {}
    for mode, label in (("infer", "inference"), ("train", "training step")):
        vals = []
        for m in models:
            s, f = by[m].get("sdpa_inductor"), by[m].get("fusepass")
            a, b = (getattr(s, f"{mode}_ms") if s else None), (getattr(f, f"{mode}_ms") if f else None)
            vals.append(a / b if a and b else None)
        speed[label] = vals
    if any(v is not None for vals in speed.values() for v in vals):
        fig, ax = plt.subplots(figsize=(1.2 * len(models) + 3, 4))
        bars(ax, speed)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("speed-up of fusepass over SDPA + Inductor")
        ax.set_title(header_short(rows))
        fig.tight_layout()
        path = os.path.join(folder, "speedup.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    mem = {v: [getattr(by[m].get(v), "train_peak_gib", None) for m in models] for v in VARIANTS}
    if any(x is not None for vals in mem.values() for x in vals):
        fig, ax = plt.subplots(figsize=(1.6 * len(models) + 3, 4))
        bars(ax, mem)
        ax.set_ylabel("peak GiB, training step")
        ax.set_title(header_short(rows))
        fig.tight_layout()
        path = os.path.join(folder, "train_memory.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    else:
        print("no memory numbers (CPU run): train_memory.png skipped", flush=True)
    for p in written:
        print(f"wrote {p}", flush=True)
    return written


def header_short(rows: list[Row]) -> str:
    r = rows[0]
    return f"{r.device}, {r.dtype}, B={r.batch}, S={r.seq}, {r.layers} layers"


def report(rows: list[Row], args) -> str:
    text = f"{header(rows)}\n{table(rows)}\n\n{notes(rows)}\n"
    print("\n" + text, flush=True)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text)
    if args.charts:
        charts(rows, args.charts)
    return text


# What says which measurement a row is (two rows with the same are the same benchmark).
SETUP = ("device", "config", "dtype", "batch", "seq", "dec_seq", "layers", "compiler")
MEASURED = [c for c in COLUMNS if c not in SETUP + ("run", "date", "torch", "triton", "transformers", "command",
                                                   "model", "variant", "attention_layers", "note", "error")]


def latest_runs(rows: list[Row]) -> list[Row]:
    """Per model and variant (first-seen order), the latest row of a CSV, its empty measurements
    filled from earlier rows of the same setup: a table made by several commands
    (``--no-compile-times``, then ``--only-compile-times``; one model per command)."""
    latest: dict[tuple[str, str], Row] = {}
    for r in rows:  # appended, so oldest first
        key, merged = (r.model, r.variant), dataclasses.replace(r)
        prev = latest.get(key)
        if prev is not None and all(getattr(prev, k) == getattr(r, k) for k in SETUP):
            used = [c for c in MEASURED if getattr(r, c) in (None, "") and getattr(prev, c) not in (None, "")]
            for c in used:
                setattr(merged, c, getattr(prev, c))
            if used:
                for c, sep in (("note", "; "), ("error", "; "), ("command", " && ")):
                    parts = [p for p in dict.fromkeys(getattr(prev, c).split(sep) + getattr(r, c).split(sep)) if p]
                    setattr(merged, c, sep.join(parts))
        latest[key] = merged
    return list(latest.values())
