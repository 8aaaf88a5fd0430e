"""The ``fusepass`` command (also ``python -m fusepass``).

    fusepass cache path                          where the autotune cache lives
    fusepass cache list [filters] [--json]       one row per tuned key
    fusepass cache show KEY [--json]             one key in full (KEY: id, id prefix or key string)
    fusepass cache clear [filters]               remove entries (all when no filter is given)
    fusepass cache export FILE [filters]         write entries to a file for another machine
    fusepass cache import FILE                   merge such a file into this cache
    fusepass demo ...                            fusepass.demo.main(argv)
    fusepass kernel ...                          commands of fusepass.kernels.cli, when present

Filters: ``--gpu TEXT`` (substring of the GPU name), ``--dtype bf16``, ``--head-dim 128``,
``--direction fwd|bwd``, ``--stale`` / ``--current``; ``--cache-dir DIR`` before or after the
action.  A cache not created yet reads as empty.  Exit status: 0 on success, 1 for an error
(unreadable file, unknown key, bad kernel predicate), 2 for bad arguments.

The ``cache`` commands import neither torch nor triton, so they start fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .autotune.cache import CacheEntry, CacheFileError, TuneCache, parse_document, parse_entries, stale_reasons
from .autotune.config import dtype_name
from .autotune.key import TuneKey, current_versions

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """An error the user can act on: printed as ``fusepass: error: ...``, exit status 1."""


# -- helpers -----------------------------------------------------------------------------------


def _dtype_arg(text: str) -> str:
    try:
        return dtype_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("fusepass: ")) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def _cache(args: argparse.Namespace) -> TuneCache:
    return TuneCache(args.cache_dir)


def _load(cache: TuneCache) -> tuple[dict[TuneKey, CacheEntry], dict[TuneKey, str]]:
    """The cache's entries; a cache not created yet is an empty one (as ``pip list`` on a fresh
    environment), with a note on stderr saying where it would be."""
    if not cache.exists():
        print(f"fusepass: note: no autotune cache at {cache.path} yet (nothing tuned here)", file=sys.stderr)
        return {}, {}
    try:
        raw = cache.read_raw(strict=True)
    except CacheFileError as e:
        raise CliError(f"{e} ('fusepass cache clear' rebuilds it)") from None
    entries, bad = parse_entries(raw)
    if bad:
        print(f"fusepass: note: {len(bad)} entries in {cache.path} are unreadable by this fusepass and not shown",
              file=sys.stderr)
    return entries, stale_reasons(entries)


def _has_filters(args: argparse.Namespace) -> bool:
    return any(getattr(args, name, None) for name in ("gpu", "dtype", "head_dim", "direction", "stale", "current"))


def _matches(args: argparse.Namespace, key: TuneKey, stale: str) -> bool:
    if args.gpu and args.gpu.lower() not in key.gpu.lower():
        return False
    if args.dtype and key.dtype != args.dtype:
        return False
    if args.head_dim and key.head_dim != args.head_dim:
        return False
    if args.direction and key.direction != args.direction:
        return False
    if args.stale and not stale:
        return False
    if args.current and stale:
        return False
    return True


def _shape_text(key: TuneKey, entry: CacheEntry) -> str:
    s = dict(entry.shape)
    if {"B", "Hq", "Hkv", "M", "N", "D"} <= set(s):
        heads = f"{s['Hq']}" if s["Hq"] == s["Hkv"] else f"{s['Hq']}/{s['Hkv']}"
        dv = f"/{s['Dv']}" if s.get("Dv", s["D"]) != s["D"] else ""
        return f"B{s['B']} H{heads} M{s['M']} N{s['N']} D{s['D']}{dv}"
    dv = f"/{key.value_head_dim}" if key.value_head_dim != key.head_dim else ""
    return f"M<={key.m_bucket} N<={key.n_bucket} D{key.head_dim}{dv} g{key.gqa_group}"


def _date_text(iso: str) -> str:
    return iso[:16].replace("T", " ")


def _record(key: TuneKey, entry: CacheEntry, stale: str) -> dict[str, Any]:
    return {
        "id": key.short_id(),
        "key": key.to_string(),
        "fields": {f: getattr(key, f) for f in key.__dataclass_fields__},
        "entry": entry.to_json(),
        "speedup_over_default": entry.speedup_over_default,
        "stale": stale,
    }


def _table(rows: list[list[Any]], headers: Sequence[str]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)


def _clip(text: str, width: int = 32) -> str:
    """Long feature signatures are cut in tables ('cache show' prints them whole)."""
    return text if len(text) <= width else text[: width - 3] + "..."


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _selected(args: argparse.Namespace, cache: TuneCache) -> tuple[list[tuple[TuneKey, CacheEntry, str]], int]:
    entries, reasons = _load(cache)
    rows = [(k, e, reasons[k]) for k, e in entries.items() if _matches(args, k, reasons[k])]
    rows.sort(key=lambda t: (t[0].gpu, t[0].dtype, t[0].head_dim, t[0].features, t[0].m_bucket, t[0].n_bucket,
                             t[0].direction))
    return rows, len(entries)


# -- cache commands ----------------------------------------------------------------------------


def cmd_cache_path(args: argparse.Namespace) -> int:
    cache = _cache(args)
    print(cache.directory if args.dir else cache.path)
    if not cache.exists():
        print("fusepass: note: the cache file does not exist yet", file=sys.stderr)
    return EXIT_OK


def cmd_cache_list(args: argparse.Namespace) -> int:
    cache = _cache(args)
    rows, total = _selected(args, cache)
    if args.json:
        print(json.dumps([_record(k, e, s) for k, e, s in rows], indent=1))
        return EXIT_OK
    if not rows:
        print(f"no entries{' match the filters' if _has_filters(args) else ''} ({total} in {cache.path})")
        return EXIT_OK
    table = [
        [
            k.short_id(), k.gpu, k.direction, k.dtype, _shape_text(k, e), _clip(k.features or "-"), e.config.short(),
            _fmt(e.time_ms, ".3f"), _fmt(e.tflops, ".1f"),
            "-" if e.speedup_over_default is None else f"{e.speedup_over_default:.2f}x",
            _fmt(e.tuning_seconds, ".1f"), _date_text(e.tuned_at), s or "ok",
        ]
        for k, e, s in rows
    ]
    headers = ["id", "gpu", "dir", "dtype", "shape", "mask", "config", "ms", "TFLOP/s", "vs default",
               "tune s", "tuned (UTC)", "status"]
    print(_table(table, headers))
    print(f"\n{len(rows)} of {total} entries, {cache.path}")
    return EXIT_OK


class EmptyCache(Exception):
    """'cache show' on a cache with no entries: reported as empty, exit status 0."""


def _find(cache: TuneCache, text: str) -> tuple[TuneKey, CacheEntry, str]:
    entries, reasons = _load(cache)
    if not entries:
        raise EmptyCache(f"the autotune cache at {cache.path} is empty: no key {text!r}")
    if text.startswith("k1;"):
        try:
            key = TuneKey.from_string(text)
        except ValueError as e:
            raise CliError(str(e).removeprefix("fusepass: ")) from None
        if key not in entries:
            raise CliError(f"no entry for key {text!r} in {cache.path}")
        return key, entries[key], reasons[key]
    if len(text) < 4:
        raise CliError(f"key id {text!r} is too short: give at least 4 characters of an id from 'fusepass cache list'")
    hits = [k for k in entries if k.short_id().startswith(text.lower())]
    if not hits:
        raise CliError(f"no entry with id {text!r} in {cache.path} (see 'fusepass cache list')")
    if len(hits) > 1:
        raise CliError(f"id {text!r} is ambiguous: it starts {', '.join(k.short_id() for k in hits)}")
    return hits[0], entries[hits[0]], reasons[hits[0]]


def cmd_cache_show(args: argparse.Namespace) -> int:
    key, entry, stale = _find(_cache(args), args.key)
    if args.json:
        print(json.dumps(_record(key, entry, stale), indent=1))
        return EXIT_OK
    fields = [[name, getattr(key, name)] for name in key.__dataclass_fields__]
    print(f"key {key.short_id()}: {key.to_string()}\n")
    print(_table(fields, ["field", "value"]))
    s = dict(entry.shape)
    info = [
        ["status", stale or "current"],
        ["shape", ", ".join(f"{n}={v}" for n, v in s.items()) or "-"],
        ["config", entry.config.short()],
        ["time", f"{entry.time_ms:.4f} ms"],
        ["TFLOP/s", _fmt(entry.tflops, ".1f")],
        ["default", "-" if entry.default_config is None else
         f"{entry.default_config.short()} {_fmt(entry.default_ms, '.4f')} ms"],
        ["speedup over default", "-" if entry.speedup_over_default is None else f"{entry.speedup_over_default:.3f}x"],
        ["configs timed", entry.candidates],
        ["tuning time", f"{entry.tuning_seconds:.2f} s"],
        ["tuned at", entry.tuned_at],
    ]
    print()
    print(_table(info, ["", ""]))
    if entry.runner_up:
        print()
        ranked = [[1, entry.config.short(), f"{entry.time_ms:.4f}", "1.000"]] + [
            [i, c.short(), f"{ms:.4f}", f"{ms / entry.time_ms:.3f}"] for i, (c, ms) in enumerate(entry.runner_up, 2)
        ]
        print(_table(ranked, ["rank", "config", "ms", "x best"]))
    return EXIT_OK


def cmd_cache_clear(args: argparse.Namespace) -> int:
    cache = _cache(args)
    if not cache.exists():
        print(f"nothing to clear: no autotune cache at {cache.path}")
        return EXIT_OK
    if not _has_filters(args):
        try:
            count = len(cache.read_raw(strict=True))
        except CacheFileError:
            count = 0  # corrupt: clearing rebuilds it
        if not cache.update(remove=lambda k, v: True):
            raise CliError(f"cannot write {cache.path}")
        print(f"removed {count} entries from {cache.path}")
        return EXIT_OK
    rows, total = _selected(args, cache)
    doomed = {k.to_string() for k, _, _ in rows}
    removed = cache.remove(lambda text, _: text in doomed) if doomed else 0
    print(f"removed {removed} of {total} entries from {cache.path}")
    return EXIT_OK


def cmd_cache_export(args: argparse.Namespace) -> int:
    cache = _cache(args)
    dest = Path(args.file)
    if dest.exists() and not args.force:
        raise CliError(f"{dest} exists (use --force to overwrite)")
    if dest.parent and not dest.parent.is_dir():
        raise CliError(f"directory {dest.parent} does not exist")
    rows, total = _selected(args, cache)
    try:
        count = cache.export_to(dest, keys=[k.to_string() for k, _, _ in rows])
    except OSError as e:
        raise CliError(f"cannot write {dest}: {e}") from None
    print(f"exported {count} of {total} entries to {dest}")
    return EXIT_OK


def cmd_cache_import(args: argparse.Namespace) -> int:
    cache = _cache(args)
    src = Path(args.file)
    if not src.is_file():
        raise CliError(f"no such file: {src}")
    added, replaced = cache.import_from(src)
    entries, reasons = _load(cache)
    incoming = set(parse_entries(parse_document(src.read_text(encoding="utf-8"), str(src)))[0])
    stale = sum(1 for k in incoming if reasons.get(k))
    print(f"imported {added + replaced} entries into {cache.path} ({added} new, {replaced} replaced)")
    if stale:
        torch_v, triton_v = current_versions()
        print(f"fusepass: note: {stale} imported entries are for other versions than torch {torch_v} / "
              f"triton {triton_v} here and will not be used", file=sys.stderr)
    return EXIT_OK


# -- demo and kernel ---------------------------------------------------------------------------


def run_demo(argv: Sequence[str]) -> int:
    try:
        demo = importlib.import_module("fusepass.demo")
    except ModuleNotFoundError as e:
        if e.name != "fusepass.demo":
            raise
        raise CliError("the demo is not available in this build (no fusepass.demo module)") from None
    result = demo.main(list(argv))
    return EXIT_OK if result is None else int(result)


def _kernel_cli() -> Any | None:
    """fusepass.kernels.cli if it exists and offers ``add_cli_commands``, else None."""
    try:
        module = importlib.import_module("fusepass.kernels.cli")
    except ModuleNotFoundError as e:
        if e.name not in ("fusepass.kernels.cli", "fusepass.kernels"):
            raise
        return None
    return module if callable(getattr(module, "add_cli_commands", None)) else None


# -- parser ------------------------------------------------------------------------------------


def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", metavar="TEXT", help="GPU name contains TEXT (case-insensitive)")
    p.add_argument("--dtype", type=_dtype_arg, help="bf16, fp16, fp32, fp8e4m3 (or torch spellings)")
    p.add_argument("--head-dim", type=_positive_int, metavar="D", help="head dim of q and k")
    p.add_argument("--direction", choices=("fwd", "bwd"))
    group = p.add_mutually_exclusive_group()
    group.add_argument("--stale", action="store_true", help="only entries this install would not use")
    group.add_argument("--current", action="store_true", help="only entries this install would use")


def _version() -> str:
    from . import __version__

    return __version__


def build_parser(with_kernel_commands: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusepass", description="fusepass: fused attention for torch.compile — tools.",
    )
    parser.add_argument("--version", action="version", version=f"fusepass {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    cache = sub.add_parser("cache", help="inspect and manage the autotune cache")
    cache.add_argument("--cache-dir", metavar="DIR", default=None,
                       help="cache directory (default: $FUSEPASS_CACHE_DIR or the user cache dir)")
    csub = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    # Also accepted after the action ('fusepass cache list --cache-dir DIR'); SUPPRESS keeps
    # the action's parser from overwriting a value given before it.
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--cache-dir", metavar="DIR", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = csub.add_parser("path", parents=[after], help="print the cache file's path")
    p.add_argument("--dir", action="store_true", help="print the directory instead of the file")
    p.set_defaults(func=cmd_cache_path)

    p = csub.add_parser("list", parents=[after], help="one row per tuned key")
    _add_filters(p)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_cache_list)

    p = csub.add_parser("show", parents=[after], help="one key in full, with runner-up timings")
    p.add_argument("key", metavar="KEY", help="an id (or its first 4+ characters) from 'cache list', or a key string")
    p.add_argument("--json", action="store_true", help="JSON instead of tables")
    p.set_defaults(func=cmd_cache_show)

    p = csub.add_parser("clear", parents=[after], help="remove entries (all of them when no filter is given)")
    _add_filters(p)
    p.set_defaults(func=cmd_cache_clear)

    p = csub.add_parser("export", parents=[after], help="write entries to FILE (for another machine with the same GPU)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    _add_filters(p)
    p.set_defaults(func=cmd_cache_export)

    p = csub.add_parser("import", parents=[after], help="merge FILE (from 'cache export') into the cache")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_cache_import)

    sub.add_parser("demo", help="run the demo (arguments go to it; 'fusepass demo --help')", add_help=False)

    module = _kernel_cli() if with_kernel_commands else None
    if module is not None:
        # Contract: add_cli_commands(subparsers) adds the "kernel" parser and its actions, each
        # with set_defaults(func=f), f(args) -> int | None (the exit status).
        module.add_cli_commands(sub)
    else:
        kernel = sub.add_parser("kernel", help="kernel tools (when the kernels provide them)")
        kernel.set_defaults(func=_no_kernel_commands)
    return parser


def _no_kernel_commands(args: argparse.Namespace) -> int:
    raise CliError("no kernel commands in this build (fusepass.kernels.cli with add_cli_commands is missing)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["demo"]:
            return run_demo(argv[1:])
        parser = build_parser(with_kernel_commands=argv[:1] == ["kernel"])
        args = parser.parse_args(argv)
        func: Callable[[argparse.Namespace], int | None] = args.func
        result = func(args)
        return EXIT_OK if result is None else int(result)
    except CliError as e:
        print(f"fusepass: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except CacheFileError as e:
        print(f"fusepass: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except EmptyCache as e:
        print(f"fusepass: {e}")
        return EXIT_OK
    except ValueError as e:  # a bad --pred or size reaching a kernel command: its message, no traceback
        if argv[:1] != ["kernel"]:
            raise
        print(f"fusepass: error: {str(e).removeprefix('fusepass: ')}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `fusepass cache list | head`
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
