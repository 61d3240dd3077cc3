"""The profile format: load/validate/save and every kind of bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _profiles import profile_doc

from artune.profile import SCHEMA_VERSION, ProfileError, load, save, select


def _write(tmp_path: Path, doc: object, name: str = "p.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def test_roundtrip(tmp_path: Path) -> None:
    doc = profile_doc()
    p = save(doc, tmp_path / "sub" / "p.json")
    prof = load(p)
    assert prof.data["schema_version"] == SCHEMA_VERSION
    assert prof.tables == doc["tables"]
    assert prof.fingerprint_id == doc["fingerprint_id"] and len(prof.fingerprint_id) == 16
    assert select(prof, 4096, "bfloat16", "graph").backend == "symm_one_shot"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="file not found.*artune tune"):
        load(tmp_path / "nope.json")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    p = save(profile_doc(), tmp_path / "p.json")
    p.chmod(0)
    with pytest.raises(ProfileError, match="cannot be read"):
        load(p)


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot be read"):
        load(tmp_path)


def test_truncated_and_non_json(tmp_path: Path) -> None:
    full = json.dumps(profile_doc())
    p = tmp_path / "t.json"
    p.write_text(full[: len(full) // 2])
    with pytest.raises(ProfileError, match="not valid JSON.*truncated"):
        load(p)
    p.write_text('{"schema')  # json says "Unterminated string starting at": no doubled "at"
    with pytest.raises(ProfileError, match="starting at line 1, column 2$"):
        load(p)
    p.write_text("hello: yaml")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load(p)
    p.write_text("[1, 2]")
    with pytest.raises(ProfileError, match="JSON object"):
        load(p)


def test_wrong_schema_version(tmp_path: Path) -> None:
    doc = profile_doc()
    doc["schema_version"] = 99
    with pytest.raises(ProfileError, match="schema_version 99 is not supported.*upgrade artune"):
        load(_write(tmp_path, doc))


def test_old_missing_or_binary_schema(tmp_path: Path) -> None:
    doc = profile_doc()
    doc["schema_version"] = 0
    with pytest.raises(ProfileError, match="schema_version 0 is not supported.*re-run"):
        load(_write(tmp_path, doc))
    doc["schema_version"] = "1"  # a string: said as such, not "'1' ... (it reads 1)"
    with pytest.raises(ProfileError, match="schema_version '1' is not a whole number"):
        load(_write(tmp_path, doc))
    del doc["schema_version"]
    with pytest.raises(ProfileError, match="has no schema_version: not an artune profile"):
        load(_write(tmp_path, doc))
    binary = tmp_path / "p.json.optuna.db"
    binary.write_bytes(b"SQLite format 3\x00\xff\xfe\x80")
    with pytest.raises(ProfileError, match="not a text file"):
        load(binary)


def test_saved_profile_is_readable_by_others_as_the_umask_allows(tmp_path: Path) -> None:
    """A profile is made once by an admin and read by whoever serves: not private (the
    temporary file it is renamed from is made 0600)."""
    import stat

    old = os.umask(0o022)
    try:
        p = save(profile_doc(), tmp_path / "p.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


def _ranges(doc: dict) -> list[dict]:
    return doc["tables"]["bfloat16"]["graph"]


def test_unsorted_ranges(tmp_path: Path) -> None:
    doc = profile_doc()
    rs = _ranges(doc)
    assert len(rs) >= 2
    rs[0], rs[1] = rs[1], rs[0]
    with pytest.raises(ProfileError, match=r"tables.bfloat16.graph\[1\].*sorted and disjoint"):
        load(_write(tmp_path, doc))


def test_overlapping_ranges(tmp_path: Path) -> None:
    doc = profile_doc()
    rs = _ranges(doc)
    rs[1]["min_bytes"] = rs[0]["max_bytes"]  # shares one byte with the previous range
    with pytest.raises(ProfileError, match="overlaps"):
        load(_write(tmp_path, doc))


def test_bad_range_bounds(tmp_path: Path) -> None:
    doc = profile_doc()
    _ranges(doc)[0]["max_bytes"] = -5
    with pytest.raises(ProfileError, match="bad byte range"):
        load(_write(tmp_path, doc))


def test_unknown_backend(tmp_path: Path) -> None:
    doc = profile_doc()
    _ranges(doc)[0]["backend"] = "warp_drive"
    with pytest.raises(ProfileError, match="unknown backend 'warp_drive'.*known: .*nccl"):
        load(_write(tmp_path, doc))


def test_a_backend_added_with_extra_backend_is_known_where_it_is_registered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tune with ``--extra-backend`` may route to that backend (its profile must not fail at
    the end of the tune); a process without it registered refuses the profile, saying why."""
    from artune import backends

    doc = profile_doc()
    _ranges(doc)[0]["backend"] = "plugin_ar"
    path = _write(tmp_path, doc)
    with pytest.raises(ProfileError, match="unknown backend 'plugin_ar'.*--extra-backend"):
        load(path)
    monkeypatch.setitem(backends.BACKENDS, "plugin_ar", "some.module:PluginAllReduce")
    assert "plugin_ar" in load(path).backends_used()


def test_unknown_mode_and_missing_tables(tmp_path: Path) -> None:
    doc = profile_doc()
    doc["tables"]["bfloat16"]["replay"] = doc["tables"]["bfloat16"].pop("graph")
    with pytest.raises(ProfileError, match="unknown mode 'replay'"):
        load(_write(tmp_path, doc))
    del doc["tables"]
    with pytest.raises(ProfileError, match="'tables'"):
        load(_write(tmp_path, doc))


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path, monkeypatch) -> None:
    p = save(profile_doc(), tmp_path / "p.json")
    before = p.read_text()

    # A crash in the middle of writing must leave the old file intact and no temp file behind.
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", boom)
    doc = profile_doc()
    doc["command"] = "changed"
    with pytest.raises(KeyboardInterrupt):
        save(doc, p)
    assert p.read_text() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["p.json"]


def test_save_refuses_invalid(tmp_path: Path) -> None:
    doc = profile_doc()
    _ranges(doc)[0]["backend"] = "nope"
    with pytest.raises(ProfileError):
        save(doc, tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()


def test_nan_written_as_null(tmp_path: Path) -> None:
    doc = profile_doc()
    doc["measurements"][0]["spread_us"] = float("nan")
    p = save(doc, tmp_path / "p.json")
    assert json.loads(p.read_text())["measurements"][0]["spread_us"] is None


def test_hand_edited_evidence_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    """What `show` reads besides the tables (validation, measurements, skipped, a range's
    points) must be lists of objects: a hand edit gets the field named, not a traceback."""
    for key, value, what in (("validation", "x", "validation must be a list"),
                             ("measurements", [1], "measurements must be a list"),
                             ("skipped", {}, "skipped must be a list")):
        doc = profile_doc()
        doc[key] = value
        with pytest.raises(ProfileError, match=what):
            load(_write(tmp_path, doc))
    doc = profile_doc()
    next(iter(next(iter(doc["tables"].values())).values()))[0]["points"] = "x"
    with pytest.raises(ProfileError, match=r"\[0\]: points must be a list of objects"):
        load(_write(tmp_path, doc))


def test_sglang_unmeasured_says_why_the_tune_has_no_sglang_candidate() -> None:
    """Whether the tune measured SGLang's own all-reduce (what keeps a served model no slower
    than SGLang's default) and, if not, why: skipped with a reason, or never a candidate.
    A profile that routes to it, or only measured it, did; a CPU dry run is not asked."""
    from _profiles import rec

    from artune.autotune.table import build_profile
    from artune.profile import Profile

    doc = profile_doc()
    assert Profile(doc).sglang_unmeasured() == "it was not among the tune's candidates"
    doc["skipped"] = [*doc.get("skipped", []),
                      {"backend": "sglang", "params": {}, "dtype": None, "mode": None,
                       "nbytes": None, "reason": "rank 0: create() failed: ImportError: x"}]
    assert Profile(doc).sglang_unmeasured() == (
        "the tune skipped it: rank 0: create() failed: ImportError: x")
    sized = dict(doc, skipped=[*doc["skipped"], {  # skipped at one size too
        "backend": "sglang", "params": {}, "dtype": "bfloat16", "mode": "graph",
        "nbytes": 4096, "reason": "gate failed"}])
    assert Profile(sized).sglang_unmeasured() == (
        "the tune skipped it: rank 0: create() failed: ImportError: x (and 1 more)")
    doc["measurements"] = [*doc.get("measurements", []), rec("sglang", 4096, 99.0)]
    assert Profile(doc).sglang_unmeasured() is None  # measured, slower everywhere: not routed
    routed = build_profile([rec("nccl", 4096, 14.0), rec("sglang", 4096, 2.0)], [],
                           fingerprint=profile_doc()["fingerprint"], command="t", dry_run=False)
    assert "sglang" in Profile(routed).backends_used()
    assert Profile(routed).sglang_unmeasured() is None
    dry = profile_doc()
    dry["dry_run"] = True
    assert Profile(dry).sglang_unmeasured() is None
