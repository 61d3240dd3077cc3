"""`artune show`: table, JSON and plot on a CPU machine."""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

from _profiles import profile_doc

from artune.inspect import human_bytes, main
from artune.profile import save


def _args(profile: Path | None, **kw: object) -> argparse.Namespace:
    return argparse.Namespace(profile=None if profile is None else str(profile),
                              plot=kw.get("plot"), json=kw.get("json", False),
                              routes=kw.get("routes"), graph_times=kw.get("graph_times"))


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (1, 1023, 1024, 1536, 4 << 20, 3 << 30)] == [
        "1B", "1023B", "1K", "1.5K", "4M", "3G"]


def test_show_table(tmp_path: Path, capsys) -> None:
    p = save(profile_doc(), tmp_path / "p.json")
    assert main(_args(p)) == 0
    out = capsys.readouterr().out
    assert "bfloat16 / graph" in out and "bfloat16 / eager" in out
    assert "symm_one_shot" in out and "symm_two_shot" in out
    assert "2.08x" in out  # 14.8 / 7.1 at 4 KiB
    assert "nvshmem4py is not installed" in out
    assert "tune time" not in out  # the document records none


def test_show_tune_time_phases(tmp_path: Path, capsys) -> None:
    doc = profile_doc()
    doc["tune_seconds"] = {"start ranks": 3.6, "setup": 29.9, "setup: build sglang": 19.2,
                           "measure nvrar": 46.1, "validation": 22.7, "total": 136.5}
    assert main(_args(save(doc, tmp_path / "p.json"))) == 0
    out = capsys.readouterr().out
    assert ("tune time: 140.1 s (136.5 s after the ranks started): start ranks 3.6 s, setup "
            "29.9 s, measure nvrar 46.1 s, validation 22.7 s") in out.replace("\n", "")
    assert "build sglang" not in out  # a part of a phase: in the profile only


def test_show_json(tmp_path: Path, capsys) -> None:
    p = save(profile_doc(), tmp_path / "p.json")
    assert main(_args(p, json=True)) == 0
    assert json.loads(capsys.readouterr().out)["tables"] == profile_doc()["tables"]


def test_show_plot_writes_png(tmp_path: Path) -> None:
    p = save(profile_doc(), tmp_path / "p.json")
    png = tmp_path / "lat.png"
    assert main(_args(p, plot=str(png))) == 0
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 600 and height > 300
    # a chosen point without its latency (hand-edited) is left off the plot, not a KeyError
    doc = profile_doc()
    for modes in doc["tables"].values():
        for ranges in modes.values():
            ranges[0]["points"][0].pop("latency_us")
    q = save(doc, tmp_path / "q.json")
    assert main(_args(q, plot=str(tmp_path / "q.png"))) == 0
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_json_with_plot_keeps_stdout_json_alone(tmp_path: Path, capsys) -> None:
    p = save(profile_doc(), tmp_path / "p.json")
    assert main(_args(p, json=True, plot=str(tmp_path / "lat"))) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["tables"] == profile_doc()["tables"]
    assert f"plot written to {tmp_path / 'lat.png'}" in err  # the suffix it got, named
    assert (tmp_path / "lat.png").is_file()


def test_show_refuses_a_plot_it_cannot_write_before_drawing(tmp_path: Path, capsys) -> None:
    p = save(profile_doc(), tmp_path / "p.json")
    assert main(_args(p, plot=str(tmp_path / "nodir" / "x.png"))) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(_args(p, plot=str(tmp_path / "x.foo"))) == 2
    err = capsys.readouterr().err
    assert "cannot write '.foo' files" in err and ".png" in err
    empty = profile_doc()
    empty["measurements"] = []
    assert main(_args(save(empty, tmp_path / "e.json"), plot=str(tmp_path / "e.png"))) == 2
    assert "no measurements to plot" in capsys.readouterr().err


def test_show_bad_profile_exits_2(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(_args(bad)) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_show_names_the_points_the_validation_rerouted(tmp_path: Path, capsys) -> None:
    doc = profile_doc()
    base = {"dtype": "bfloat16", "mode": "eager", "best_backend": "symm_one_shot",
            "best_params": {}, "best_us": 30.0, "within": True}
    doc["validation"] = [
        dict(base, nbytes=4096, routed_backend="symm_one_shot", routed_params={},
             routed_us=30.5, rerouted_from={"backend": "nvrar", "params": {"ctas": 8},
                                            "routed_us": 63.0, "within": False}),
        dict(base, nbytes=8192, routed_backend="nvrar", routed_params={"ctas": 16},
             routed_us=30.1, rerouted_from={"backend": "nvrar", "params": {"ctas": 8},
                                            "routed_us": 40.0, "within": False}),
        dict(base, nbytes=65536, routed_backend="symm_one_shot", routed_params={},
             routed_us=30.2),
    ]
    assert main(_args(save(doc, tmp_path / "p.json"))) == 0
    out = capsys.readouterr().out
    assert "within tolerance of the fastest candidate at 3/3 points" in out
    assert "then validated again: 2 point(s)" in out
    assert "bfloat16/eager 4K: nvrar -> symm_one_shot" in out
    assert "bfloat16/eager 8K: nvrar(ctas=8) -> nvrar(ctas=16)" in out  # parameters only
    assert "64K:" not in out


def test_show_routes_next_to_what_the_profile_says(tmp_path: Path, capsys) -> None:
    """``--routes DIR``: the plugin's route trace (one file per process, calls summed), each
    row marked where the backend that took it is not the profile's choice."""
    from artune.integration.sglang import SGLANG_OWN

    p = save(profile_doc(), tmp_path / "p.json")
    routes = tmp_path / "routes"
    routes.mkdir()
    rows = [
        {"group": "tp:0", "mode": "graph", "dtype": "bfloat16", "nbytes": 4096,
         "backend": "symm_one_shot", "calls": 64},  # the profile's choice at 4K
        {"group": "tp:0", "mode": "graph", "dtype": "bfloat16", "nbytes": 65536,
         "backend": SGLANG_OWN, "calls": 2},  # the profile says symm_one_shot: differs
        {"group": "tp:0", "mode": "eager", "dtype": "bfloat16", "nbytes": 1 << 30,
         "backend": SGLANG_OWN, "calls": 1},  # beyond the table: SGLang's own, as it should
    ]
    for pid in (1, 2):
        (routes / f"routes-pid{pid}.json").write_text(json.dumps({"pid": pid, "routes": rows}))
    assert main(_args(p, routes=str(routes))) == 0
    out = capsys.readouterr().out
    assert "routes taken (2 process(es))" in out
    lines = {ln.split("│")[4].strip(): ln for ln in out.splitlines() if "tp:0" in ln}
    assert sorted(lines) == ["1G", "4K", "64K"]
    assert "symm_one_shot" in lines["4K"] and "128" in lines["4K"]  # 64 calls x 2 processes
    assert "differs" not in lines["4K"]
    assert "symm_one_shot (differs)" in lines["64K"]
    assert "not covered" in lines["1G"] and "differs" not in lines["1G"]
    assert "1 row(s) differ from the profile" in out

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_args(p, routes=str(empty))) == 2
    assert "no route trace" in capsys.readouterr().err
    # a folder that is not one: said before the table is printed
    assert main(_args(p, routes=str(tmp_path / "nowhere"))) == 2
    got = capsys.readouterr()
    assert "is not a folder" in got.err and got.out == ""


def test_show_reader_going_away_is_not_an_error(tmp_path: Path) -> None:
    """`artune show P --json --plot x.png | head -1`: status 0, the plot drawn all the same
    (the reference profile's JSON is far larger than a pipe's buffer)."""
    import subprocess
    import sys

    from conftest import artune_env

    ref = Path(__file__).resolve().parents[1] / "artune" / "profiles" / "6eeb601b655cf21c.json"
    png = tmp_path / "x.png"
    p = subprocess.Popen([sys.executable, "-m", "artune.cli", "show", str(ref), "--json",
                          "--plot", str(png)], env=artune_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert p.stdout is not None and p.stdout.readline().strip() == b"{"
    p.stdout.close()
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    assert b"Traceback" not in err and png.is_file()


def test_a_narrow_terminal_gets_the_parameters_as_notes_and_nothing_cut() -> None:
    """80 columns: the numbers and names stay whole, the parameters go under the table as
    numbered notes; a wide console keeps them in their column."""
    import io
    from pathlib import Path

    from rich.console import Console

    from artune.inspect import render
    from artune.profile import load

    folder = Path(__file__).resolve().parents[1] / "artune" / "profiles"
    ref = load(folder / "6eeb601b655cf21c.json")
    narrow, wide = io.StringIO(), io.StringIO()
    render(ref, Console(file=narrow, width=80))
    render(ref, Console(file=wide, width=200))
    text = narrow.getvalue()
    assert "…" not in text
    assert "nvrar [1]" in text
    assert "  [1] algo=twoshot block=512 ctas=64 proto=lamport warps=4" in text
    assert "3.01x – │" in text and "5.71x │" in text  # a range may wrap at its dash there
    assert all(len(line) <= 80 for line in text.splitlines() if line.startswith(("│", "┃")))
    full = wide.getvalue()
    assert "│ nvrar   │ algo=twoshot block=512 ctas=64" in full and "[1]" not in full
    assert "3.01x–5.71x" in full
    # every committed profile: no digit lost at 80 columns (the first 2x H200 one's 772.8-1015.9
    # µs was cut to "772.8–1015." before its ranges could wrap; the current one has 227.6-1058.0)
    paths = sorted(folder.glob("*.json"))
    assert len(paths) >= 3 and folder / "14a710852913dd3b.json" in paths
    for path in paths:
        buf = io.StringIO()
        render(load(path), Console(file=buf, width=80))
        assert "…" not in buf.getvalue(), path
        if path.name == "14a710852913dd3b.json":
            assert "227.6 –" in buf.getvalue() and "1058.0" in buf.getvalue()



def test_show_graph_times_per_process_and_graph(tmp_path: Path, capsys) -> None:
    """``--graph-times DIR``: each process's graphs (one per captured batch size), ordered by
    their median GPU time, with the spread; alone or after a profile's table; a folder
    without times is an error before anything is printed."""
    folder = tmp_path / "times"
    folder.mkdir()
    lines = [f"{t} 11 {2500 + t % 5}.00" for t in range(20)]  # graph 0xb: 2500-2504 µs
    lines += [f"{t} 22 {3300 + t % 3}.00" for t in range(20, 30)]  # graph 0x16: 3300-3302
    (folder / "graph-times-pid7.txt").write_text("\n".join(lines) + "\n")
    (folder / "graph-times-pid8.txt").write_text("40 11 2400.00\n")
    assert main(_args(None, graph_times=str(folder))) == 0
    out = capsys.readouterr().out
    assert "CUDA-graph replays (2 process(es))" in out
    rows = [[c.strip() for c in ln.split("│")[1:-1]] for ln in out.splitlines()
            if "pid" in ln]
    assert rows == [["pid7", "b", "20", "2502.0", "2500.0", "2504.0"],
                    ["pid7", "16", "10", "3301.0", "3300.0", "3302.0"],
                    ["pid8", "b", "1", "2400.0", "2400.0", "2400.0"]]
    p = save(profile_doc(), tmp_path / "p.json")
    assert main(_args(p, graph_times=str(folder))) == 0
    out = capsys.readouterr().out
    assert "bfloat16 / graph" in out and "CUDA-graph replays" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_args(p, graph_times=str(empty))) == 2
    got = capsys.readouterr()
    assert "no graph times" in got.err and got.out == ""
    assert main(_args(None)) == 2
    assert "give a profile" in capsys.readouterr().err
