"""``obd inspect`` over every fixture kind: real field values, stack contributions, JSON, plots, errors."""

from __future__ import annotations

import json
import re
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fixtures import FIXTURES, fixture_path, materialize, resolved_config
from obd.cli import main
from obd.errors import ObdError
from obd.inspect.report import inspect_files
from obd.inspect.stack import short_names
from obd.inspect.stats import HISTOGRAM_BUCKETS, coverage, length_histogram, referenced_sectors
from obd.lsmt.format import INVALID_ENTRY, HeaderTrailer, encode_mapping

OBD = "overlaybd"
FACTS = json.loads(fixture_path(f"{OBD}/facts/blob_facts.json").read_text())
MiB = 1 << 20
VSIZE = 64 * MiB

FILE_KEYS = {
    "path",
    "size",
    "kinds",
    "kind",
    "description",
    "tar",
    "zfile",
    "lsmt",
    "rw_data",
    "rw_index",
    "warnings",
}
STACK_KEYS = {
    "layer_count",
    "virtual_size",
    "virtual_size_from",
    "layers",
    "uuid_chain_ok",
    "merged_entries",
    "data_bytes",
    "zero_bytes",
    "hole_bytes",
    "fragmentation",
    "warnings",
}


def one(path, **kw):
    """The report of a single file."""
    report = inspect_files([str(path)], **kw).report
    assert len(report["files"]) == 1
    return report["files"][0]


def cli_json(capsys, *args):
    assert main(["inspect", "--json", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out)


def cli_text(capsys, *args):
    assert main(["inspect", *map(str, args)]) == 0
    return capsys.readouterr().out


# --- sealed layers -------------------------------------------------------------------------------


def test_plain_commit_with_message(capsys):
    f = cli_json(capsys, fixture_path(f"{OBD}/lsmt/commit/L2.msg.commit"))["files"][0]
    assert f["kinds"] == ["lsmt"] and f["kind"] == "layer"
    m = f["lsmt"]
    assert m["variant"] == "commit"
    assert m["user_tag"] == "hello commit message"
    assert m["header"]["flags"] == 0x07 and m["trailer"]["flags"] == 0x06
    assert m["trailer"]["flag_names"] == ["trailer", "data", "sealed"]
    assert m["uuid"] == "33333333-3333-4333-8333-333333333333"
    assert m["parent_uuid"] == "22222222-2222-4222-8222-222222222222"
    assert (m["version"], m["sub_version"]) == (1, 1)
    assert m["index"] == {
        "offset": 83456,
        "slots": 256,
        "valid": 6,
        "padding": 250,
        "empty": 0,
        "entries": 6,
        "tags_on_disk": [0],
    }
    # L2's live data: 155 sectors written and kept, one 16-sector trim (MANIFEST §1.2)
    assert m["space"] == {
        "size": VSIZE,
        "data_bytes": 79360,
        "zero_bytes": 8192,
        "unmapped_bytes": VSIZE - 79360 - 8192,
        "beyond_size_bytes": 0,
    }
    assert m["storage"] == {
        "data_area_bytes": 79360,
        "live_data_bytes": 79360,
        "garbage_bytes": 0,
        "remote_bytes": 0,
    }
    fr = m["fragmentation"]
    assert (fr["entries"], fr["data_entries"], fr["zero_entries"]) == (6, 5, 1)
    assert fr["longest"] == {"offset": 16384, "length": 65536, "zeroed": False}
    assert sum(b["count"] for b in fr["histogram"]) == 6
    assert len(fr["histogram"]) == HISTOGRAM_BUCKETS
    text = cli_text(capsys, fixture_path(f"{OBD}/lsmt/commit/L2.msg.commit"))
    assert '  user_tag       "hello commit message"  ' in text
    assert "256 slots at 83456: 6 valid, 250 padding, 0 empty" in text
    assert "64.0 MiB (67108864 B)" in text


@pytest.mark.parametrize("layer", ["L0", "L1", "L2"])
@pytest.mark.parametrize("algo", ["lz4", "zstd"])
def test_zfile_commits(layer, algo):
    rel = f"lsmt/commit/{layer}.{algo}.commit"
    plain = materialize(f"{OBD}/lsmt/commit/{layer}.commit")
    f = one(fixture_path(f"{OBD}/{rel}"))
    assert f["kinds"] == ["zfile", "lsmt"] and f["kind"] == "layer"
    z = f["zfile"]
    facts = FACTS[rel]
    assert z["algorithm"] == algo and z["algorithm_id"] == facts["header"]["algo"]
    assert (z["block_size"], z["verify"]) == (4096, True)
    assert z["record_used"] == "header"  # overlaybd-commit -z overwrites the header
    assert z["header"]["flags"] == 0x1B and z["trailer"]["flags"] == 0x16
    assert z["header"]["header_overwrite"] and not z["trailer"]["header_overwrite"]
    assert z["header"]["digest_status"] == z["trailer"]["digest_status"] == "valid"
    assert z["block_count"] == facts["trailer"]["index_size"]
    assert z["original_size"] == plain.stat().st_size
    assert z["compressed_size"] == facts["file_size"]
    assert z["ratio"] == pytest.approx(plain.stat().st_size / facts["file_size"])
    blocks = z["compressed_blocks"]
    assert blocks["min"] <= blocks["median"] <= blocks["max"] <= 4096 + 64
    assert blocks["total"] + 4 * z["block_count"] == z["index_offset"] - 512
    assert f["lsmt"] == one(plain)["lsmt"]  # the same layer, compressed or not


def test_tar_wrapped_commit(capsys):
    path = fixture_path(f"{OBD}/lsmt/commit/L2.lz4-tar.commit")
    f = cli_json(capsys, path)["files"][0]
    assert f["kinds"] == ["tar", "zfile", "lsmt"]
    assert f["description"].startswith("tar → zfile → lsmt: ")
    t = f["tar"]
    assert t["entry_name"] == "overlaybd.commit" and t["mode"] == 0o100644
    assert t["pax_records"] == {"size": "76820"}
    assert (t["payload_offset"], t["payload_size"], t["overlaybd_offset"]) == (1536, 76820, 1536)
    assert t["trailing_size"] == 79872 - 1536 - 76820 == t["trailing_padding"] + 1024
    assert t["trailing_extra"] == 0
    assert [h["typeflag"] for h in t["headers"]] == ["x", "0"]
    z = f["zfile"]
    assert z["header"]["flags"] == 0x1B and z["trailer"]["flags"] == 0x16
    assert z["header"]["flag_names"] == ["header", "type", "header_overwrite", "digest"]
    assert z["trailer"]["flag_names"] == ["type", "sealed", "digest"]
    assert z["compressed_size"] == 76820 and z["original_size"] == 91648
    text = cli_text(capsys, path)
    assert "0x1b" in text and "0x16" in text
    assert "entry          overlaybd.commit, mode 0100644" in text
    assert "at 1536, 75.0 KiB (76820 B)" in text


def test_close_sealed_layer():
    m = one(fixture_path(f"{OBD}/lsmt/seal/L1.sealed"))["lsmt"]
    assert m["variant"] == "close-sealed"
    assert m["header"]["flags"] == 0x03 and m["trailer"]["flags"] == 0x06
    assert m["index"]["slots"] == m["index"]["valid"] == 5 and m["index"]["padding"] == 0
    assert m["storage"]["garbage_bytes"] == 0


@pytest.fixture(scope="module")
def ext4_base(tmp_path_factory) -> Path:
    """The old-style base layer ``ext4_64``, extracted from its .tar.gz into a temporary directory."""
    path = tmp_path_factory.mktemp("ext4base") / "ext4_64"
    with tarfile.open(fixture_path(f"{OBD}/ext4/base/ext4_64.tar.gz")) as tar:
        member = next(m for m in tar.getmembers() if m.isfile() and Path(m.name).name == "ext4_64")
        src = tar.extractfile(member)
        assert src is not None
        with src, path.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    return path


def test_old_base_layer_garbage_flags_and_padding(ext4_base, capsys):
    f = cli_json(capsys, ext4_base)["files"][0]
    assert f["kinds"] == ["zfile", "lsmt"]
    z = f["zfile"]
    assert z["record_used"] == "trailer"
    assert (z["algorithm"], z["block_size"], z["verify"], z["block_count"]) == ("lz4", 4096, True, 132309)
    assert z["compressed_size"] == 4737695 and z["original_size"] == 541937664
    for rec in (z["header"], z["trailer"]):
        assert rec["digest_status"] == "absent"
        assert rec["garbage_flag_bits"] and rec["flags"] & 0x3F == rec["flags"] - rec["garbage_flag_bits"]
        assert rec["nonzero_padding"]
    assert z["header"]["flags"] & 0xFF == 0x43 and z["trailer"]["flags"] & 0xFF == 0x46
    assert not z["index_crc_checked"]
    assert sum("garbage high bits" in w for w in f["warnings"]) == 2
    m = f["lsmt"]
    assert m["uuid"] == "C02FB491-B4D4-4904-8684-A014D032AF78"
    assert m["parent_uuid"] == "00000000-0000-0000-0000-000000000000"
    assert m["virtual_size"] == 64 << 30
    assert (m["index"]["slots"], m["index"]["valid"], m["index"]["padding"]) == (8448, 8323, 125)
    assert m["fragmentation"]["zero_entries"] == 8209
    assert m["space"]["data_bytes"] + m["space"]["zero_bytes"] + m["space"]["unmapped_bytes"] == 64 << 30
    assert m["storage"]["garbage_bytes"] == 0
    text = cli_text(capsys, ext4_base)
    assert "8448 slots at 541798400: 8323 valid, 125 padding" in text
    assert "garbage bits   0x" in text and "absent" in text


def test_empty_layer_commits():
    m = one(fixture_path(f"{OBD}/lsmt/cli-create/empty1g.commit"))["lsmt"]
    assert m["index"]["slots"] == 0 and m["fragmentation"]["entries"] == 0
    assert m["space"]["unmapped_bytes"] == 1 << 30
    assert m["uuid"] == "44444444-4444-4444-8444-444444444444"
    f = one(fixture_path(f"{OBD}/lsmt/cli-create/empty1g.nouuid.commit"))
    assert any("uuid is null" in w for w in f["warnings"])
    assert one(fixture_path(f"{OBD}/lsmt/cli-create/empty1g.lz4.commit"))["zfile"]["block_count"] == 2


# --- raw ZFiles ----------------------------------------------------------------------------------

ZFILES = sorted(p.name for p in (FIXTURES / OBD / "zfile" / "cli").iterdir() if p.suffix == ".zfile")


@pytest.mark.parametrize("name", ZFILES)
def test_raw_zfiles(name):
    f = one(fixture_path(f"{OBD}/zfile/cli/{name}"))
    facts = FACTS[f"zfile/cli/{name}"]
    assert f["kinds"] == ["zfile", "data"] and f["kind"] == "data"
    assert f["lsmt"] is None
    z = f["zfile"]
    assert z["record_used"] == "trailer"  # overlaybd-zfile does not overwrite the header
    assert z["header"]["flags"] == 0x13 and z["trailer"]["flags"] == 0x16
    assert z["algorithm_id"] == facts["trailer"]["algo"]
    assert z["block_size"] == facts["trailer"]["block_size"]
    assert z["block_count"] == facts["trailer"]["index_size"]
    assert z["original_size"] == facts["trailer"]["original_file_size"]
    assert z["index_crc"] == int(facts["trailer"]["index_crc"], 16)
    assert z["trailer"]["digest"] == int(facts["trailer"]["digest"], 16)
    if z["block_count"]:
        first = facts["block_lengths_first"][0] - 4
        assert z["compressed_blocks"]["min"] <= first <= z["compressed_blocks"]["max"]
    else:
        assert z["compressed_blocks"] is None


def test_tar_wrapped_raw_zfile():
    f = one(fixture_path(f"{OBD}/zfile/cli/odd_100003.bin.lz4.bs4.zfile.tar"))
    assert f["kinds"] == ["tar", "zfile", "data"]
    assert f["tar"]["payload_size"] == f["zfile"]["compressed_size"] == 56343
    assert f["zfile"]["original_size"] == 100003


def test_not_an_overlaybd_blob(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just some text\n" * 100)
    f = one(path)
    assert f["kinds"] == ["raw"] and f["kind"] == "raw"
    assert "not an overlaybd blob" in f["description"]
    assert f["tar"] is f["zfile"] is f["lsmt"] is None


# --- RW layers -----------------------------------------------------------------------------------


def rwindex(name):
    return json.loads(fixture_path(f"{OBD}/lsmt/rw/{name}.rwindex.json").read_text())["index"]


def test_rw_append_pair_found_by_name(capsys):
    """L2.data finds L2.index; the replay matches overlaybd's in-memory index (obd-reftool rwindex)."""
    f = cli_json(capsys, fixture_path(f"{OBD}/lsmt/rw/L2.data"))["files"][0]
    assert f["kind"] == "rw-data"
    d = f["rw_data"]
    assert d["mode"] == "append" and d["pairing"] == "sibling"
    assert d["index_file"] == str(fixture_path(f"{OBD}/lsmt/rw/L2.index"))
    assert d["header"]["flags"] == 0x03 and d["index_header"]["flags"] == 0x01
    assert d["index_header"]["index_offset"] == 4096
    r = d["records"]
    assert (r["records"], r["write_records"], r["trim_records"], r["invalid_records"]) == (7, 6, 1, 0)
    assert r["record_tags"] == [0] and r["dropped_records"] == 0
    ref = rwindex("L2")
    p = d["replay"]
    assert p["entries"] == len(ref)
    live = sum(m["length"] for m in ref if not m["zeroed"]) * 512
    assert p["space"]["data_bytes"] == p["live_data_bytes"] == live == 79360
    assert p["space"]["zero_bytes"] == sum(m["length"] for m in ref if m["zeroed"]) * 512
    # The only overwrite: 8 KiB at 52428800, then 4 KiB inside it at 52430848: 12 KiB written for
    # 8 KiB live there. Nothing else overlaps, so the whole layer's garbage is that region's 4 KiB.
    region = [m for m in ref if 102400 <= m["offset"] < 102416]
    assert sum(m["length"] for m in region) * 512 == 8192
    assert r["written_bytes"] == 83456 == p["data_area_bytes"]
    assert p["garbage_bytes"] == 83456 - 79360 == 4096
    text = cli_text(capsys, fixture_path(f"{OBD}/lsmt/rw/L2.data"))
    assert "garbage (overwritten) 4.0 KiB (4096 B)" in text
    assert "(found next to the data file)" in text


def test_rw_index_alone():
    f = one(fixture_path(f"{OBD}/lsmt/rw/L2.index"))
    assert f["kind"] == "rw-index"
    d = f["rw_index"]
    assert d["header"]["flags"] == 0x01 and not d["warp"]
    assert d["data_file"] == str(fixture_path(f"{OBD}/lsmt/rw/L2.data"))
    assert d["replay"]["entries"] == len(rwindex("L2"))
    assert d["replay"]["garbage_bytes"] == 4096


def test_rw_index_without_its_data_file(tmp_path):
    shutil.copy(fixture_path(f"{OBD}/lsmt/rw/L2.index"), tmp_path / "L2.index")
    d = one(tmp_path / "L2.index")["rw_index"]
    assert d["data_file"] is None
    assert d["replay"]["data_area_bytes"] == d["records"]["written_bytes"] == 83456
    assert d["replay"]["garbage_bytes"] == 4096


def test_rw_writable_data_pair_and_explicit_upper(tmp_path, capsys):
    """overlaybd's writable_data/writable_index naming pairs by itself; --upper pairs anything."""
    data = materialize(f"{OBD}/lsmt/rw/L0.data")
    index = fixture_path(f"{OBD}/lsmt/rw/L0.index")
    alone = one(data)  # the materialised copy has no sibling index
    assert alone["rw_data"]["replay"] is None
    assert any("no index file found" in w for w in alone["warnings"])

    shutil.copy(data, tmp_path / "writable_data")
    shutil.copy(index, tmp_path / "writable_index")
    paired = one(tmp_path / "writable_data")["rw_data"]
    assert paired["pairing"] == "sibling"

    report = cli_json(capsys, "--upper", data, index)
    explicit = report["files"][0]["rw_data"]
    assert explicit["pairing"] == "explicit"
    assert report["stack"] is None
    for d in (paired, explicit):
        ref = rwindex("L0")
        assert d["replay"]["entries"] == len(ref)
        assert d["replay"]["live_data_bytes"] == sum(m["length"] for m in ref) * 512
        assert d["replay"]["garbage_bytes"] == 0  # L0 never overwrites


def test_rw_index_not_matching_uuid_is_not_paired(tmp_path):
    shutil.copy(fixture_path(f"{OBD}/lsmt/rw/L2.data"), tmp_path / "x.data")
    shutil.copy(fixture_path(f"{OBD}/lsmt/rw/L1.index"), tmp_path / "x.index")
    assert one(tmp_path / "x.data")["rw_data"]["index_file"] is None


def test_cli_create_rw_files(capsys):
    base = f"{OBD}/lsmt/cli-create"
    d = one(fixture_path(f"{base}/rw1g.data"))["rw_data"]
    assert d["mode"] == "append" and d["pairing"] == "sibling" and d["virtual_size"] == 1 << 30
    assert d["records"]["records"] == 0 and d["replay"]["space"]["unmapped_bytes"] == 1 << 30
    p = one(fixture_path(f"{base}/rw1g-parent.data"))["rw_data"]
    assert p["parent_uuid"] == "11111111-1111-4111-8111-111111111111"
    assert p["index_header"]["parent_uuid"] == p["parent_uuid"]

    sparse = one(materialize(f"{base}/rw1g-sparse.data"))
    s = sparse["rw_data"]
    assert s["mode"] == "sparse" and s["header"]["flags"] == 0x13
    assert s["holes"]["apparent_size"] == (1 << 30) + 4096
    assert s["holes"]["entries"] == 0 and s["holes"]["space"]["unmapped_bytes"] == 1 << 30
    assert sparse["description"] == "lsmt: RW data file, sparse mode"

    empty = one(fixture_path(f"{base}/rw1g-sparse.index"))
    assert empty["kind"] == "empty" and empty["size"] == 0

    turbo = one(fixture_path(f"{base}/rw1g-turbo.index"))
    assert turbo["kind"] == "rw-index" and turbo["rw_index"]["records"]["records"] == 0
    meta = one(materialize(f"{base}/rw1g-turbo.data"))  # a warp fs-meta file has no header
    assert meta["kind"] == "raw"

    text = cli_text(capsys, fixture_path(f"{base}/rw1g.data"), fixture_path(f"{base}/rw1g.index"))
    assert "rw index file" in text and "rw data file: append mode" in text


def test_sparse_rw_layer_hole_map(tmp_path):
    """A sparse RW layer written here (its index is the data file's allocation map)."""
    from obd.lsmt.rw import create_rw

    path = tmp_path / "sparse.data"
    layer = create_rw(str(path), None, 16 * MiB, sparse=True)
    layer.pwrite(b"\x01" * 8192, 0)
    layer.pwrite(b"\x02" * 4096, 8 * MiB)
    layer.close()
    h = one(path)["rw_data"]["holes"]
    assert h["data_extents"] >= 2
    assert h["space"]["data_bytes"] >= 12288
    assert h["space"]["data_bytes"] + h["space"]["unmapped_bytes"] == 16 * MiB


# --- stacks --------------------------------------------------------------------------------------

L012 = [
    f"{OBD}/lsmt/commit/L0.commit",
    f"{OBD}/lsmt/commit/L1.lz4.commit",
    f"{OBD}/lsmt/commit/L2.zstd.commit",
]


def expected_contributions(merged_index, layers):
    """Data / zero bytes per layer position from overlaybd's merged index (tag 0 = top layer)."""
    out = [[0, 0] for _ in range(layers)]
    for m in merged_index:
        out[layers - 1 - m["tag"]][m["zeroed"]] += m["length"] * 512
    return out


def test_three_layer_stack_contributions(capsys):
    report = cli_json(capsys, *(materialize(r) for r in L012))
    st = report["stack"]
    assert set(st) == STACK_KEYS
    assert st["layer_count"] == 3 and st["virtual_size"] == VSIZE and st["virtual_size_from"] == 2
    assert st["uuid_chain_ok"] and st["warnings"] == []
    assert [ly["parent_ok"] for ly in st["layers"]] == [None, True, True]
    data = sum(ly["data_bytes"] for ly in st["layers"])
    zero = sum(ly["zero_bytes"] for ly in st["layers"])
    assert data == st["data_bytes"] and zero == st["zero_bytes"]
    assert st["data_bytes"] + st["zero_bytes"] + st["hole_bytes"] == VSIZE
    # the same numbers from the merged index overlaybd itself built (facts/lsmt_L0L1L2.mergedindex.json)
    merged = json.loads(fixture_path(f"{OBD}/facts/lsmt_L0L1L2.mergedindex.json").read_text())["index"]
    assert st["merged_entries"] == len(merged)
    want = expected_contributions(merged, 3)
    assert [[ly["data_bytes"], ly["zero_bytes"]] for ly in st["layers"]] == want
    assert st["data_bytes"] == sum(w[0] for w in want)
    assert [ly["data_bytes"] for ly in st["layers"]] == [10595840, 16384, 79360]
    for ly, f in zip(st["layers"], report["files"], strict=True):
        own = f["lsmt"]["space"]
        assert (
            ly["hidden_bytes"] == own["data_bytes"] + own["zero_bytes"] - ly["data_bytes"] - ly["zero_bytes"]
        )
    assert st["fragmentation"]["entries"] == len(merged)
    text = cli_text(capsys, *(materialize(r) for r in L012))
    assert "== stack: 3 layers, lowest first" in text
    assert "uuid chain     ok" in text


def test_stack_with_rw_upper_matches_committed_top(capsys):
    """L2's RW pair as the upper gives the same device as its commit."""
    files = [materialize(r) for r in L012[:2]]
    committed = cli_json(capsys, *files, materialize(L012[2]))["stack"]
    as_last_file = cli_json(capsys, *files, fixture_path(f"{OBD}/lsmt/rw/L2.data"))
    explicit = cli_json(
        capsys,
        *files,
        "--upper",
        fixture_path(f"{OBD}/lsmt/rw/L2.data"),
        fixture_path(f"{OBD}/lsmt/rw/L2.index"),
    )
    for report in (as_last_file, explicit):
        st = report["stack"]
        assert st["layers"][2]["role"] == "upper"
        for key in ("data_bytes", "zero_bytes", "hole_bytes", "uuid_chain_ok"):
            assert st[key] == committed[key]
        assert [ly["data_bytes"] for ly in st["layers"]] == [ly["data_bytes"] for ly in committed["layers"]]
    assert len(as_last_file["files"]) == 3  # L2.index was absorbed, not reported as a stray file


def test_wrong_order_warns_about_uuid_chain(capsys):
    paths = [fixture_path(f"{OBD}/lsmt/commit/L1.commit"), materialize(L012[0])]
    assert main(["inspect", *map(str, paths)]) == 0
    captured = capsys.readouterr()
    assert "BROKEN" in captured.out
    assert "warning: layer 1 (" in captured.out
    assert "parent_uuid 00000000-0000-0000-0000-000000000000 is not the uuid of layer 0" in captured.out
    st = cli_json(capsys, *paths)["stack"]
    assert st["uuid_chain_ok"] is False
    assert [ly["parent_ok"] for ly in st["layers"]] == [None, False]
    assert len(st["warnings"]) == 1


def test_ext4_stack(ext4_base):
    """Real image layers: the convertor left layer 1's parent null, so the chain check warns."""
    paths = [
        ext4_base,
        fixture_path(f"{OBD}/ext4/l1/overlaybd.commit"),
        fixture_path(f"{OBD}/ext4/l2/overlaybd.commit"),
    ]
    report = inspect_files([str(p) for p in paths]).report
    st = report["stack"]
    assert [ly["parent_ok"] for ly in st["layers"]] == [None, False, True]
    assert st["virtual_size"] == 64 << 30
    assert st["data_bytes"] + st["zero_bytes"] + st["hole_bytes"] == 64 << 30
    assert sum(ly["data_bytes"] for ly in st["layers"]) == st["data_bytes"]
    assert report["files"][1]["kinds"] == ["tar", "zfile", "lsmt"]


def test_config_stack(capsys):
    cfg = resolved_config(f"{OBD}/cfg/lsmt-stack-mixed.json")
    report = cli_json(capsys, "--config", cfg)
    assert [f["kinds"] for f in report["files"]] == [["zfile", "lsmt"], ["lsmt"], ["tar", "zfile", "lsmt"]]
    assert report["files"][0]["zfile"]["algorithm"] == "zstd"
    st = report["stack"]
    assert st["layer_count"] == 3 and st["uuid_chain_ok"]
    merged = json.loads(fixture_path(f"{OBD}/facts/lsmt_L0L1L2.mergedindex.json").read_text())["index"]
    assert [[ly["data_bytes"], ly["zero_bytes"]] for ly in st["layers"]] == expected_contributions(merged, 3)


def test_files_that_are_not_a_stack_get_a_note():
    report = inspect_files(
        [
            str(fixture_path(f"{OBD}/lsmt/commit/L1.commit")),
            str(fixture_path(f"{OBD}/zfile/cli/tiny_1.bin.lz4.bs4.zfile")),
        ]
    ).report
    assert report["stack"] is None
    assert len(report["notes"]) == 1 and "tiny_1.bin.lz4.bs4.zfile is not a layer" in report["notes"][0]


# --- merged and turboOCI blobs -------------------------------------------------------------------


def rebuild_from_facts(key: str, out: Path) -> Path:
    """A blob with the exact header, index and trailer blob_facts.json records (data area zero-filled)."""
    e = FACTS[key]

    def record(x):
        return HeaderTrailer(
            flags=x["flags"],
            index_offset=x["index_offset"],
            index_size=x["index_size"],
            virtual_size=x["virtual_size"],
            uuid=x["uuid"],
            parent_uuid=x["parent_uuid"],
            user_tag=x["user_tag"].encode(),
        )

    h, t = e["header"], e["trailer"]
    index = b"".join(
        encode_mapping(m["offset"], m["length"], m["moffset"], bool(m["zeroed"]), m["tag_on_disk"])
        for m in e["index"]
    )
    with out.open("wb") as f:
        f.write(record(h).pack())
        f.truncate(t["index_offset"])
        f.seek(t["index_offset"])
        f.write(index + INVALID_ENTRY * (t["index_size"] - len(e["index"])))
        f.write(record(t).pack())
    assert out.stat().st_size == e["file_size"]
    return out


def test_merged_blob_keeps_source_layer_tags(tmp_path):
    path = rebuild_from_facts(
        "lsmt/merge/L012.plain.merged.nocompress.commit.bz2", tmp_path / "merged.commit"
    )
    f = one(path)
    m = f["lsmt"]
    assert m["variant"] == "commit" and not m["warp"]
    assert m["index"]["tags_on_disk"] == [0, 1, 2]
    assert (m["index"]["valid"], m["index"]["padding"]) == (17, 239)
    assert any("overlaybd-merge" in w for w in f["warnings"])
    assert m["storage"]["garbage_bytes"] == 0


def test_turbooci_meta_layer(tmp_path, capsys):
    """A turboOCI fs-meta blob: tag-1 mappings point into the OCI tar, outside the blob's data area."""
    path = rebuild_from_facts("turbooci/l1gz/ext4.fs.meta.plain", tmp_path / "ext4.fs.meta")
    f = cli_json(capsys, path)["files"][0]
    m = f["lsmt"]
    assert m["variant"] == "turbooci" and m["warp"]
    assert m["index"]["tags_on_disk"] == [0, 1]
    assert m["index"]["padding"] == 0  # warp commits do not pad their index
    index = FACTS["turbooci/l1gz/ext4.fs.meta.plain"]["index"]
    remote = sum(x["length"] for x in index if x["tag_on_disk"] == 1) * 512
    local = sum(x["length"] for x in index if x["tag_on_disk"] == 0 and not x["zeroed"]) * 512
    assert m["storage"]["remote_bytes"] == remote
    assert m["storage"]["live_data_bytes"] == local == m["storage"]["data_area_bytes"]
    assert m["space"]["data_bytes"] == remote + local
    assert "turboOCI" in f["description"]


# --- JSON, plots, errors -------------------------------------------------------------------------


def test_json_document_keys(capsys, ext4_base):
    report = cli_json(
        capsys,
        materialize(L012[0]),
        fixture_path(f"{OBD}/lsmt/commit/L2.lz4-tar.commit"),
    )
    assert set(report) == {"schema", "files", "stack", "notes"} and report["schema"] == 1
    for f in report["files"]:
        assert set(f) == FILE_KEYS
        assert isinstance(f["size"], int)
    tar = report["files"][1]["tar"]
    assert set(tar) >= {
        "entry_name",
        "mode",
        "pax_records",
        "payload_offset",
        "payload_size",
        "trailing_size",
    }
    z = report["files"][1]["zfile"]
    assert set(z) >= {
        "record_used",
        "algorithm",
        "block_size",
        "verify",
        "block_count",
        "compressed_size",
        "original_size",
        "ratio",
        "compressed_blocks",
        "header",
        "trailer",
    }
    assert {"digest_status", "garbage_flag_bits", "flag_names", "header_overwrite"} <= set(z["trailer"])
    m = report["files"][0]["lsmt"]
    assert set(m) >= {
        "header",
        "trailer",
        "uuid",
        "parent_uuid",
        "index",
        "space",
        "storage",
        "fragmentation",
    }
    assert set(report["stack"]["layers"][0]) == {
        "position",
        "path",
        "role",
        "uuid",
        "parent_uuid",
        "parent_ok",
        "virtual_size",
        "entries",
        "mapped_bytes",
        "data_bytes",
        "zero_bytes",
        "hidden_bytes",
    }


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_plot_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "layers.png"
    assert main(["inspect", *(str(materialize(r)) for r in L012), "--plot", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.err
    width, height = png_size(out)
    assert width >= 800 and height >= 400
    assert out.stat().st_size > 20_000  # drawn bands and a histogram, not an empty canvas
    single = tmp_path / "one.png"
    assert (
        main(["inspect", "--json", str(fixture_path(f"{OBD}/lsmt/rw/L2.data")), "--plot", str(single)]) == 0
    )
    json.loads(capsys.readouterr().out)  # --json stdout stays pure JSON
    assert png_size(single)[0] >= 800


def test_plot_without_layers_is_an_error(tmp_path, capsys):
    out = tmp_path / "none.png"
    assert (
        main(["inspect", str(fixture_path(f"{OBD}/zfile/cli/tiny_1.bin.lz4.bs4.zfile")), "--plot", str(out)])
        == 1
    )
    assert "nothing to plot" in capsys.readouterr().err
    assert not out.exists()


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    from obd.inspect.plot import plot_layout

    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    layout = inspect_files([str(fixture_path(f"{OBD}/lsmt/commit/L1.commit"))]).layout
    with pytest.raises(ObdError, match="'plot' extra"):
        plot_layout(layout, tmp_path / "x.png")


def corrupt(tmp_path, rel, offset, data):
    path = tmp_path / Path(rel).name
    raw = bytearray(fixture_path(f"{OBD}/{rel}").read_bytes())
    pos = offset if offset >= 0 else len(raw) + offset
    raw[pos : pos + len(data)] = data
    path.write_bytes(bytes(raw))
    return path


def test_corrupt_blob_is_one_line_error(tmp_path, capsys):
    path = corrupt(tmp_path, "lsmt/commit/L1.commit", -4096 + 40, (2_000_000).to_bytes(8, "little"))
    assert main(["inspect", str(path)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"obd: error: {path}: trailer.index_size=2000000")
    assert "Traceback" not in captured.err and captured.out == ""


@pytest.mark.parametrize(
    ("rel", "offset", "data", "expect"),
    [
        # a byte of the ZFile header's zero padding: the header digest no longer matches
        (
            "lsmt/commit/L1.lz4.commit",
            100,
            b"\x01",
            r"header\.digest=\d+ \(0x[0-9a-f]+\): record digest mismatch",
        ),
        # magic1 gone: not a ZFile any more, just bytes
        ("lsmt/commit/L1.lz4.commit", 8, b"\xff" * 16, "kind +raw: not an overlaybd blob"),
        # layer data is never read: still a valid layer
        ("lsmt/commit/L2.commit", 4096 + 8, b"\xff" * 16, "kind +lsmt: read-only LSMT layer"),
        # the LSMT trailer's index_offset off the 512-byte grid
        (
            "lsmt/commit/L1.commit",
            -4096 + 32,
            (65536 + 3).to_bytes(8, "little"),
            "trailer.index_offset=65539",
        ),
        # a ZFile jump-table entry of 0 bytes: the index CRC catches it
        ("lsmt/commit/L2.lz4.commit", 76216, b"\0\0\0\0", r"header\.index_crc=\d+ .*index CRC mismatch"),
        # an RW index record far outside anything, inspected without its data file
        ("lsmt/rw/L2.index", 4096 + 8, (1 << 54).to_bytes(8, "little"), "kind +lsmt: RW index file"),
    ],
)
def test_damaged_files(tmp_path, capsys, rel, offset, data, expect):
    path = corrupt(tmp_path, rel, offset, data)
    rc = main(["inspect", str(path)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if expect.startswith("kind"):
        assert rc == 0 and re.search(expect, captured.out)
    else:
        assert rc == 1 and len(captured.err.splitlines()) == 1
        assert captured.err.startswith(f"obd: error: {path}: ") and re.search(expect, captured.err)


def test_trailer_digest_bad_is_reported_not_fatal(tmp_path):
    """overlaybd never checks the trailer's digest; inspect says it is bad and carries on."""
    path = corrupt(tmp_path, "lsmt/commit/L2.lz4.commit", -512 + 200, b"\x01")
    f = one(path)
    assert f["zfile"]["trailer"]["digest_status"] == "bad"
    assert f["zfile"]["header"]["digest_status"] == "valid"
    assert any("trailer digest" in w for w in f["warnings"])
    assert f["lsmt"]["uuid"] == "33333333-3333-4333-8333-333333333333"


def test_argument_errors(tmp_path, capsys):
    assert main(["inspect"]) == 1
    assert "nothing to inspect" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 1
    assert "not a regular file" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "cannot open" in capsys.readouterr().err
    cfg = resolved_config(f"{OBD}/cfg/lsmt-stack-plain.json")
    assert main(["inspect", "--config", str(cfg), str(fixture_path(f"{OBD}/lsmt/commit/L1.commit"))]) == 1
    assert "not both" in capsys.readouterr().err
    assert main(["inspect", "--upper", str(fixture_path(f"{OBD}/lsmt/commit/L1.commit"))]) == 1
    assert "--upper needs an RW data file" in capsys.readouterr().err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["inspect", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--plot" in out and "--upper" in out and "--json" in out


# --- helpers -------------------------------------------------------------------------------------


def test_length_histogram_buckets():
    hist = length_histogram(np.array([1, 2, 3, 4, 7, 8, 16383, 0]))
    counts = [b["count"] for b in hist]
    assert counts[:4] == [1, 2, 2, 1] and counts[13] == 1 and sum(counts) == 7
    assert hist[13] == {"min_sectors": 8192, "max_sectors": 16383, "count": 1}


def test_coverage_clips_to_size():
    c = coverage(np.array([0, 10, 20]), np.array([4, 4, 8]), np.array([False, True, False]), 24 * 512)
    assert c == {
        "data_bytes": 8 * 512,
        "zero_bytes": 4 * 512,
        "unmapped_bytes": 12 * 512,
        "beyond_size_bytes": 4 * 512,
    }


def test_referenced_sectors_counts_overlaps_once():
    assert referenced_sectors(np.array([8, 10, 30]), np.array([4, 4, 2]), 8, 100) == 6 + 2
    assert referenced_sectors(np.array([]), np.array([]), 8, 100) == 0


def test_short_names():
    assert short_names(["/a/l1/overlaybd.commit", "/a/l2/overlaybd.commit", "/b/base"]) == [
        "l1/overlaybd.commit",
        "l2/overlaybd.commit",
        "base",
    ]
