"""The nested artifact: nested codes, exact prefixes, exact budgets, byte-identical extraction, strict reading."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import bitalloc
from bitalloc.errors import BitallocError, InputError
from bitalloc.formats import get_format
from bitalloc.formats.packing import unpack_bits
from bitalloc.io.safetensors import SafetensorsFile
from bitalloc.models.view import ModelView
from bitalloc.nest import Artifact, artifact_bytes, extract, extract_packed, nest_model
from bitalloc.nest.codes import depth_grid, from_planes, nested_codes, nested_grid, to_planes
from bitalloc.rounding import dequantize
from bitalloc.formats.refit import layer_output_error
from tests.conftest import tiny_llama, tiny_qwen2

GROUP, DEPTH = 32, 6


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_llama()
    win = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("nest") / "art"
    nest_model(model, ModelView(model), win, out, group=GROUP, max_bits=DEPTH, outliers=2, progress=False)
    return out


def _codes(q) -> torch.Tensor:  # noqa: ANN001
    fmt = get_format(q.format)
    fmt = getattr(fmt, "base", fmt)  # +o2: the int codes under the outliers
    rows, cols = q.shape
    ng = fmt.ngroups(cols)
    return unpack_bits(q.parts["weight_packed"], fmt.bits, rows * ng * GROUP).reshape(rows, ng * GROUP)[:, :cols]


# --- codes ---------------------------------------------------------------------------------------------------
def test_codes_nest_and_gptq_lowers_the_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(24, 96)
    x = torch.randn(512, 96) * torch.linspace(0.2, 3, 96)
    h = x.T @ x / 512
    step, low = nested_grid(w, GROUP, DEPTH, torch.diagonal(h))
    rtn = nested_codes(w, step, low, GROUP, DEPTH, None)
    gptq = nested_codes(w, step, low, GROUP, DEPTH, h)
    for codes in (rtn, gptq):
        for k in range(2, DEPTH):
            assert torch.equal(codes[k], codes[DEPTH] >> (DEPTH - k))
    err = {k: [layer_output_error(w, depth_grid(step, low, DEPTH, k, GROUP).values(c[k]), h) for c in (rtn, gptq)]
           for k in range(2, DEPTH + 1)}
    assert sum(g for _, g in err.values()) < sum(r for r, _ in err.values())  # the joint GPTQ beats nearest bins
    assert all(err[k][0] > err[k + 1][0] for k in range(2, DEPTH))  # deeper is finer


def test_planes_round_trip() -> None:
    codes = torch.randint(0, 1 << 5, (7, 13))
    planes = to_planes(codes, 5)
    assert all(p.numel() == -(-7 * 13 // 8) for p in planes)
    for k in range(1, 6):
        assert torch.equal(from_planes(planes[:k], (7, 13)), codes >> (5 - k))


def test_depth_grids_are_exact_int_formats() -> None:
    w = torch.randn(8, 64) * 0.05 + 0.01
    step, low = nested_grid(w, GROUP, DEPTH)
    codes = nested_codes(w, step, low, GROUP, DEPTH, None)
    for k in range(2, DEPTH + 1):
        grid = depth_grid(step, low, DEPTH, k, GROUP)
        q = get_format(f"int{k}-g{GROUP}").encode(codes[k], grid, (8, 64))  # refuses non-fp16 scales and zeros
        assert torch.equal(dequantize(q), grid.values(codes[k]))


# --- the artifact --------------------------------------------------------------------------------------------
def test_every_prefix_decodes_to_what_the_extracted_model_holds(art: Path) -> None:
    ex = extract(art, "5bpw")
    with Artifact(art) as a:
        for name, fmt in ex.plan.assignments.items():
            assert torch.equal(_codes(a.qtensor(name, fmt)), _codes(a.qtensor(name, f"int{DEPTH}-g{GROUP}+o2")) >>
                               (DEPTH - int(fmt[3])))
            assert all(torch.equal(t, ex.qtensors[name].parts[p]) for p, t in a.qtensor(name, fmt).parts.items())
            assert fmt.endswith("+o2")
    model = bitalloc.load(art, budget="5bpw")
    params = dict(model.named_parameters())
    for name, q in ex.qtensors.items():
        assert torch.equal(params[name], dequantize(q).reshape(params[name].shape))


@pytest.mark.parametrize("budget", ["4.2bpw", "4.9bpw", "6.5bpw", "55000B"])
def test_budget_met_to_the_byte(art: Path, budget: str) -> None:
    from bitalloc.budget import Budget

    ex = extract(art, budget)
    with Artifact(art) as a:
        limit = Budget.parse(budget).resolve(a.total_params)
    stored = sum(q.nbytes() for q in ex.qtensors.values())
    assert stored == ex.plan.total_bytes <= limit
    slack = limit - stored
    with Artifact(art) as a:  # no tensor could take its next depth within the bytes left (the plan is optimal)
        for name, fmt in ex.plan.assignments.items():
            k = int(fmt[3])
            if k < DEPTH:
                shape = tuple(a.tensors[name]["shape"])
                step = get_format(fmt.replace(f"int{k}", f"int{k + 1}", 1)).nbytes(shape) - get_format(fmt).nbytes(shape)
                assert step > slack, (name, fmt, step, slack)


def test_more_bytes_less_error(art: Path) -> None:
    errs = [extract(art, f"{b}bpw").plan.error for b in (4.1, 4.5, 5, 6, 7.5)]
    assert errs == sorted(errs, reverse=True) and errs[0] > errs[-1]


def test_extract_twice_is_byte_identical(art: Path, tmp_path: Path) -> None:
    a = extract_packed(art, "4.5bpw", tmp_path / "a")
    b = extract_packed(art, "4.5bpw", tmp_path / "b")
    assert a == b
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    loaded = bitalloc.load(tmp_path / "a")
    direct = bitalloc.load(art, budget="4.5bpw")
    assert all(torch.equal(p, dict(direct.named_parameters())[n]) for n, p in loaded.named_parameters())


def test_nested_not_a_cache(art: Path) -> None:
    with Artifact(art) as a:
        largest = sum(get_format(f"int{DEPTH}-g{GROUP}+o2").nbytes(tuple(e["shape"])) for e in a.tensors.values())
        largest += a.measurement.fixed_bytes
        tensors = 0
        for shard in {e["shard"] for e in [*a.tensors.values(), *a.fixed.values()]}:
            with SafetensorsFile(art / shard) as sf:
                tensors += sum(sf.info(k).nbytes for k in sf.keys())
    assert tensors <= 1.15 * largest  # tensor data; the bench reports the whole directory of the real model
    assert artifact_bytes(art) > tensors


def test_refusals_before_work(art: Path) -> None:
    with pytest.raises(BitallocError, match="budget"):
        extract(art, "1bpw")
    with pytest.raises(InputError, match="nested artifact"):
        bitalloc.load(art)
    with pytest.raises(InputError, match="not nested from a GGUF"):
        extract(art, "5.5bpw", gguf=True)


def _copy(art: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(art, dst)
    return dst


def test_flipped_plane_bit_refused_when_read(art: Path, tmp_path: Path) -> None:
    dst = _copy(art, tmp_path)
    shard = sorted(dst.glob("tensors-0000.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = max((k for k in header if k.endswith(".plane0")), key=lambda k: header[k]["data_offsets"][1])
    data[8 + n + header[key]["data_offsets"][1] - 1] ^= 1  # the top plane of a tensor: every depth reads it
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match its manifest"):
        extract(dst, "5bpw")


@pytest.mark.parametrize("craft", ["truncate", "nest_json", "group", "table", "manifest", "extra_file", "shape",
                                   "refit", "refit_v1", "version"])
def test_crafted_artifacts_refused_in_one_line(art: Path, tmp_path: Path, craft: str) -> None:
    dst = _copy(art, tmp_path)
    meta = json.loads((dst / "nest.json").read_text())
    if craft == "truncate":
        p = dst / "tensors-0001.safetensors"
        p.write_bytes(p.read_bytes()[:100])
    elif craft == "nest_json":
        (dst / "nest.json").write_text("{not json")
    elif craft == "group":
        meta["group"] = 48
        (dst / "nest.json").write_text(json.dumps(meta))
    elif craft == "table":
        (dst / "measurement.json").write_text((dst / "measurement.json").read_text().replace("int3-g32", "int3-g64"))
    elif craft == "manifest":
        (dst / "manifest.json").unlink()
    elif craft == "extra_file":
        (dst / "tensors-0042.safetensors").write_bytes(b"\0" * 16)
    elif craft == "shape":
        name = next(iter(meta["tensors"]))
        meta["tensors"][name]["shape"] = [3, 5]
        (dst / "nest.json").write_text(json.dumps(meta))
    elif craft in ("refit", "refit_v1", "version"):
        meta.update({"refit": DEPTH - 1} if craft == "refit" else {"format_version": 1} if craft == "refit_v1"
                    else {"format_version": 3})
        (dst / "nest.json").write_text(json.dumps(meta))
    for verify in (True, False) if craft in ("group", "shape", "truncate", "refit", "refit_v1", "version") else (True,):
        with pytest.raises(InputError) as e:
            extract(dst, "5bpw", verify=verify)
        assert "\n" not in str(e.value)


def test_zero_scale_byte_refused(art: Path, tmp_path: Path) -> None:
    from bitalloc.io.safetensors import SafetensorsFile

    dst = _copy(art, tmp_path)
    shard = dst / "tensors-0000.safetensors"
    with SafetensorsFile(shard) as sf:
        info = sf.info(next(k for k in sf.keys() if k.endswith(".mu2")))
        base = shard.stat().st_size - sum(sf.info(k).nbytes for k in sf.keys())
        name = next(k for k in sf.keys() if k.endswith(".mu2")).removesuffix(".mu2")
    data = bytearray(shard.read_bytes())
    data[base + info.begin] = 0
    shard.write_bytes(bytes(data))
    with Artifact(dst, verify=False) as a, pytest.raises(InputError, match="zero scale byte"):
        a.qtensor(name, f"int2-g{GROUP}+o2")


def test_refit_lowers_the_shallow_errors_and_version_1_still_reads(tmp_path: Path) -> None:
    model = tiny_llama()
    win = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(2))
    for refit in (0, 2):
        nest_model(model, ModelView(model), win, tmp_path / f"r{refit}", group=GROUP, max_bits=4, refit=refit,
                   fisher=False, progress=False)
    errs = [{k: sum(r.output_error for r in Artifact(tmp_path / f"r{refit}").measurement.rows
                    if r.format == f"int{k}-g{GROUP}") for k in (2, 3)} for refit in (0, 2)]
    assert errs[1][2] < 0.9 * errs[0][2] and errs[1][3] < errs[0][3]
    assert json.loads((tmp_path / "r2" / "nest.json").read_text())["refit"] == 2
    with SafetensorsFile(tmp_path / "r2" / "tensors-0000.safetensors") as sf:
        assert any(k.endswith(".mu3") for k in sf.keys()) and not any(k.endswith(".mu4") for k in sf.keys())
    meta = json.loads((tmp_path / "r0" / "nest.json").read_text())  # what version 1 wrote: no refit key
    before = extract(tmp_path / "r0", "4bpw")
    meta["format_version"] = 1
    del meta["refit"]
    (tmp_path / "r0" / "nest.json").write_text(json.dumps(meta))
    after = extract(tmp_path / "r0", "4bpw", verify=False)
    assert before.plan.assignments == after.plan.assignments and set(before.qtensors) == set(after.qtensors)
    assert all(torch.equal(before.qtensors[n].parts[p], t)
               for n, q in after.qtensors.items() for p, t in q.parts.items())


def test_untied_model_with_biases(tmp_path: Path) -> None:
    model = tiny_qwen2()
    win = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    nest_model(model, ModelView(model), win, tmp_path / "art", group=64, max_bits=3, outliers=0, fisher=False,
               progress=False)
    ex = extract(tmp_path / "art", "3bpw", objective="output")
    assert {f for f in ex.plan.assignments.values()} <= {"int2-g64", "int3-g64"}
    loaded = bitalloc.load(tmp_path / "art", budget="3bpw")
    assert set(dict(loaded.named_parameters())) == set(ex.qtensors)


def test_options_refused(tmp_path: Path) -> None:
    model = tiny_llama()
    win = torch.randint(0, 256, (2, 16))
    for kw in ({"group": 48}, {"max_bits": 9}, {"max_bits": 1}, {"outliers": 3}, {"outliers": 128}, {"passes": -1},
               {"passes": 17}, {"passes": True}, {"refit": 5, "max_bits": 6}, {"refit": -1}):
        with pytest.raises(InputError):
            nest_model(model, ModelView(model), win, tmp_path / "x", progress=False, **kw)
    assert not (tmp_path / "x").exists()


def test_a_prefix_reads_only_its_planes(art: Path, tmp_path: Path) -> None:
    """Zeroing the deepest plane of every tensor in place: a small model never reads it (extracts and verifies), a
    model that needs it is refused."""
    from bitalloc.io.safetensors import SafetensorsFile

    dst = _copy(art, tmp_path)
    for shard in sorted(dst.glob("tensors-000*.safetensors")):
        with SafetensorsFile(shard) as sf:
            spans = [sf.info(k) for k in sf.keys() if k.endswith(f".plane{DEPTH - 1}")]
            base = shard.stat().st_size - sum(sf.info(k).nbytes for k in sf.keys())
        data = bytearray(shard.read_bytes())
        for info in spans:
            data[base + info.begin: base + info.end] = b"\xff" * (info.end - info.begin)
        shard.write_bytes(bytes(data))
    small = extract(dst, "4bpw")
    assert all(not f.startswith(f"int{DEPTH}-") for f in small.plan.assignments.values())
    assert all(torch.equal(q.parts["weight_packed"], extract(art, "4bpw").qtensors[n].parts["weight_packed"])
               for n, q in small.qtensors.items() if n in small.plan.assignments)
    with pytest.raises(InputError, match="does not match its manifest"):
        extract(dst, "7.9bpw")


def test_lattice_covers_every_group_range_with_fp16_values() -> None:
    from bitalloc.nest.codes import lattice

    torch.manual_seed(3)
    lo = torch.randn(4000) * 0.3  # positive and negative minima, some rounding up in fp16
    hi = lo + torch.rand(4000) * 0.7
    for depth in (2, 6, 8):
        step, low = lattice(lo, hi, depth)
        assert bool((low <= lo).all()) and bool((low + step * 2 ** depth >= hi).all())
        assert torch.equal(step.half().float(), step) and torch.equal(low.half().float(), low)
