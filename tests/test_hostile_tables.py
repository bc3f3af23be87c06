"""Hostile and careless plans, measurement tables and budgets: one ``error:`` line (exit 2) or success, never a
traceback.  Hand-written cases for each class of malformed value, then a seeded property test that feeds random
edits of a valid table and plan (measured from a tiny model) to the library loaders and through the CLI."""
from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from bitalloc.allocate import allocate
from bitalloc.budget import Budget, Constraints
from bitalloc.cli import main
from bitalloc.errors import BitallocError, BudgetError, InputError
from bitalloc.measure import Measurement
from bitalloc.plan import Plan

from test_resume import make_hf_dir

torch.set_num_threads(1)

_INF = "\u0000INF\u0000"  # markers replaced in the serialized text by literals json.dumps cannot write
_NAN = "\u0000NAN\u0000"
_VALUES: list[Any] = [-1, 0, 1, _INF, _NAN, 10**40, 2**63, "abc", "", {"x": 1}, [], None, True, 1.5, -0.0, [1, "a"]]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A tiny HF model, its measurement table and a 5bpw plan, all made by the CLI."""
    root = tmp_path_factory.mktemp("hostile")
    model = make_hf_dir(root / "model", layers=1)
    table, plan = root / "table.json", root / "plan.json"
    assert main(["measure", str(model), "--calib", str(root / "calib.txt"), "--formats", "int4-g32,int8-g32,fp16",
                 "--method", "rtn", "--windows", "2", "--ctx", "16", "--fisher-windows", "1", "-q",
                 "--out", str(table)]) == 0
    assert main(["plan", str(table), "--budget", "6bpw", "-q", "--out", str(plan)]) == 0
    return {"model": model, "table": table, "plan": plan, "calib": root / "calib.txt"}


def _dump(d: Any) -> str:
    text = json.dumps(d, indent=1)
    return text.replace(json.dumps(_INF), "1e309").replace(json.dumps(_NAN), "NaN")


def _slots(v: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key/index) in ``v``, depth first."""
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for k, x in items:
        out.append((v, k))
        _slots(x, out)
    return out


def mutate(text: str, rng: random.Random) -> bytes:
    """One random edit of a valid JSON file: delete a key, change a type or a number, rename a key, duplicate
    an entry, or damage the bytes (truncate, insert non-UTF-8 bytes)."""
    kind = rng.choice(["value", "value", "value", "delete", "rename", "duplicate", "truncate", "bytes"])
    raw = text.encode()
    if kind == "truncate":
        return raw[: rng.randrange(len(raw))]
    if kind == "bytes":
        at = rng.randrange(len(raw))
        return raw[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\x80\x80", b"\xed\xa0\x80"]) + raw[at:]
    d = json.loads(text)
    slots = _slots(d, [])
    parent, key = rng.choice(slots)
    if kind == "value":
        parent[key] = copy.deepcopy(rng.choice(_VALUES + [rng.choice(slots)[0]]))  # a scalar, or another container
    elif kind == "delete":
        del parent[key]
    elif kind == "rename" and isinstance(parent, dict):
        parent[rng.choice(["zz", key.upper(), key + " "])] = parent.pop(key)
    elif isinstance(parent, list):
        parent.append(parent[key])
    else:  # a key written twice
        return _dump(d)[:-2].encode() + b",\n " + json.dumps(key).encode() + b": 1\n}"
    return _dump(d).encode()


def _ok_or_one_line(fn, *args: Any) -> str:
    """Run ``fn``; success -> "ok", a BitallocError with a one-line message -> "error"; anything else fails."""
    try:
        fn(*args)
    except BitallocError as e:
        msg = str(e)
        assert msg and "\n" not in msg, repr(msg)
        return "error"
    return "ok"


def _allocate(path: Path) -> None:
    m = Measurement.load(path)
    allocate(m, "6bpw", objective="output")


def test_random_edits_of_tables_and_plans_through_the_library(made, tmp_path):
    table_text, plan_text = made["table"].read_text(), made["plan"].read_text()
    good = Measurement.load(made["table"])
    rng = random.Random(16)
    seen: dict[str, int] = {}
    for i in range(120):
        p = tmp_path / f"t{i}.json"
        p.write_bytes(mutate(table_text, rng))
        r = _ok_or_one_line(_allocate, p)
        seen["table " + r] = seen.get("table " + r, 0) + 1
    for i in range(120):
        p = tmp_path / f"p{i}.json"
        p.write_bytes(mutate(plan_text, rng))
        r = _ok_or_one_line(Plan.load, p, good)
        seen["plan " + r] = seen.get("plan " + r, 0) + 1
    assert seen.get("table error", 0) > 60 and seen.get("plan error", 0) > 60, seen


def _cli(argv: list[str], capsys) -> int:
    capsys.readouterr()
    rc = main(argv)
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err, cap.err
    if rc != 0:
        lines = cap.err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), (rc, cap.err)
    return rc


def test_random_edits_through_the_cli(made, tmp_path, capsys):
    rng = random.Random(6)
    table_text, plan_text = made["table"].read_text(), made["plan"].read_text()
    for i in range(40):  # `bitalloc plan TABLE`: no model is loaded
        t = tmp_path / f"t{i}.json"
        t.write_bytes(mutate(table_text, rng))
        out = tmp_path / f"plan{i}.json"
        if _cli(["plan", str(t), "--budget", "6bpw", "-q", "--out", str(out)], capsys) != 0:
            assert not out.exists()
    base = ["quantize", str(made["model"]), "--calib", str(made["calib"]), "--windows", "2", "--ctx", "16",
            "--method", "rtn", "--budget", "6bpw", "-q"]
    for i in range(8):  # `bitalloc quantize --measurement T --plan P`: a bad plan is refused before the model loads
        t, p = tmp_path / f"qt{i}.json", tmp_path / f"qp{i}.json"
        t.write_text(table_text)
        p.write_bytes(mutate(plan_text, rng))
        if i % 4 == 3:
            t.write_bytes(mutate(table_text, rng))
        out = tmp_path / f"q{i}"
        if _cli(base + ["--measurement", str(t), "--plan", str(p), "--out", str(out)], capsys) != 0:
            assert not out.exists()


# --- one case per class, with the words the message must contain -----------------------------------
def _edit_table(made: dict[str, Path], tmp_path: Path, fn) -> Path:
    d = json.loads(made["table"].read_text())
    fn(d)
    p = tmp_path / "t.json"
    p.write_text(_dump(d))
    return p


@pytest.mark.parametrize("fn, words", [
    (lambda d: d["rows"][0].__setitem__(2, "12"), ["rows[0][2]", "integer"]),
    (lambda d: d["rows"][0].__setitem__(2, d["rows"][0][2] + 1), ["rows[0][2]", "takes exactly"]),
    (lambda d: d["rows"][0].__setitem__(3, _INF), ["not valid JSON", "float range"]),
    (lambda d: d["rows"][0].__setitem__(3, _NAN), ["not valid JSON", "NaN"]),
    (lambda d: d["rows"][0].__setitem__(3, -1.0), ["rows[0][3]", "finite number"]),
    (lambda d: d["rows"][0].__setitem__(1, "q9_z"), ["rows[0][1]", "q9_z"]),
    (lambda d: d["rows"][0].__setitem__(1, "q4_k"), ["rows[0][1]", "q4_k"]),  # 64 columns: no 256-block
    (lambda d: d["rows"][0].__setitem__(0, {"name": "x"}), ["rows[0][0]", "string"]),
    (lambda d: d["rows"].append(list(d["rows"][0])), ["duplicate row"]),
    (lambda d: d["tensors"][0].__setitem__("shape", [0, 64]), ["tensors[0].shape[0]"]),
    (lambda d: d["tensors"][0].__setitem__("numel", 10**40), ["not valid JSON", "digits"]),
    (lambda d: d["tensors"][0].__setitem__("roles", "linear"), ["tensors[0].roles", "array"]),
    (lambda d: d["tensors"][0].pop("name"), ["tensors[0]", "missing key 'name'"]),
    (lambda d: d.__setitem__("total_params", 2**63), ["total_params"]),
    (lambda d: d.__setitem__("total_params", 1), ["total_params", "less than"]),
    (lambda d: d.__setitem__("fingerprint", {"model": 5}), ["fingerprint['model']", "string"]),
    (lambda d: d.__setitem__("fingerprint", ["model"]), ["fingerprint", "JSON object"]),
    (lambda d: d.__setitem__("rows", {}), ["rows", "JSON array"]),
])
def test_malformed_table_names_file_and_entry(made, tmp_path, fn, words):
    p = _edit_table(made, tmp_path, fn)
    with pytest.raises(InputError) as e:
        Measurement.load(p)
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("raw, words", [
    (b"\xff\xfe{}", ["not UTF-8", "offset 0"]),
    (b"[1, 2, 3]", ["not a bitalloc measurement file"]),
    (b"{\"kind\": \"bitalloc.measurement\", \"kind\": 1}", ["appears twice"]),
    (b"[" * 50000, ["not valid JSON"]),
    (b"", ["not valid JSON"]),
])
def test_undecodable_table(tmp_path, raw, words):
    p = tmp_path / "t.json"
    p.write_bytes(raw)
    with pytest.raises(InputError) as e:
        Measurement.load(p)
    for w in words:
        assert w in str(e.value), str(e.value)


@pytest.mark.parametrize("edit, words", [
    (lambda d, n: d.__setitem__("budget_bytes", 1e309), ["not valid JSON"]),
    (lambda d, n: d.__setitem__("budget_bytes", "5MB"), ["budget_bytes", "integer"]),
    (lambda d, n: d.__setitem__("gap_rel", "small"), ["gap_rel"]),
    (lambda d, n: d.__setitem__("objective", ["fisher"]), ["objective"]),
    (lambda d, n: d["tensors"].__setitem__(n, {"format": {"id": "fp16"}}), ["format", "string"]),
    (lambda d, n: d["tensors"].__setitem__(n, {"format": "fp16", "bytes": -3}), [".bytes", "integer"]),
    (lambda d, n: d["tensors"].__setitem__(n, 7), ["JSON object"]),
    (lambda d, n: d.__setitem__("fingerprint", "abc"), ["fingerprint"]),
])
def test_malformed_plan_names_file_and_entry(made, tmp_path, edit, words):
    d = json.loads(made["plan"].read_text())
    edit(d, next(iter(d["tensors"])))
    p = tmp_path / "p.json"
    p.write_text(_dump(d))
    with pytest.raises(InputError) as e:
        Plan.load(p, Measurement.load(made["table"]))
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("text", ["1e400bpw", "123456789012345678901234567890", "123456789012345678901234567890B",
                                  "1e308TiB", "inf", "nan", "-1", "0", "0bpw", "2000bpw", "9" * 100, 10**30, 0])
def test_budget_out_of_range(text):
    with pytest.raises(BudgetError) as e:
        Budget.parse(text)
    assert "\n" not in str(e.value)


def test_budget_too_large_for_the_model_and_cli(made, tmp_path, capsys):
    with pytest.raises(BudgetError, match="outside"):
        Budget.parse("1000bpw").resolve(2**52)
    for b in ("1e400bpw", "123456789012345678901234567890", "nan"):
        out = tmp_path / "p.json"
        assert _cli(["plan", str(made["table"]), "--budget", b, "-q", "--out", str(out)], capsys) == 2
        assert not out.exists()


def test_constraints_from_dict_is_type_checked():
    for bad in ({"tie_groups": "abc"}, {"pinned": {"a": 3}}, {"min_bpw": "3"}, {"bpw_bounds": [["a", 1]]},
                {"allowed": [["a", "int4-g32"]]}, {"max_bpw": float("inf")}, []):
        with pytest.raises(InputError):
            Constraints.from_dict(bad)  # type: ignore[arg-type]


def test_table_naming_tensors_the_model_lacks_is_refused_before_quantizing(made, tmp_path, capsys):
    d = json.loads(made["table"].read_text())
    del d["fingerprint"]["model"]  # no weight fingerprint to catch it: the names and shapes must
    old = d["tensors"][1]["name"]
    d["tensors"][1]["name"] = old + ".renamed"
    for r in d["rows"]:
        r[0] = old + ".renamed" if r[0] == old else r[0]
    t = tmp_path / "t.json"
    t.write_text(_dump(d))
    out = tmp_path / "q"
    argv = ["quantize", str(made["model"]), "--calib", str(made["calib"]), "--windows", "2", "--ctx", "16",
            "--method", "rtn", "--budget", "6bpw", "-q", "--measurement", str(t), "--out", str(out)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not describe the model" in err[0] and ".renamed" in err[0], err
    assert not out.exists()
