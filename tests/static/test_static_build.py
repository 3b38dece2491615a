"""The static GPU build check (bench/static.py) as a CI gate: every Triton kernel the launchers
launch, at their own sm_80 and sm_90 configurations, in every dtype they accept, and every CUDA
source, compiled as a GPU install would build it; no GPU needed. The Triton figures are those
of the ptxas run Triton itself makes (its command line, its log): the cubin a GPU would load.
Compiled results are cached in ~/.cache/fastssl/static (keyed by the kernel sources and the
launch's specialisation, so a change recompiles what it touches); a cold run compiles about 450
Triton binaries (minutes on 2 cores). The glue check needs a CUDA torch's headers: the run
passes --download-headers (fetched once into the cache; $FASTSSL_TORCH_CUDA_INCLUDE points at
an installed CUDA torch's include/ instead)."""
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bench import static as S  # noqa: E402

pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # A fresh process: this one runs the kernels under TRITON_INTERPRET, which the check must not.
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("static")
    res = subprocess.run([sys.executable, "-m", "bench.static", "--out", str(out),
                          "--download-headers"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=3600)
    path = out / "static.jsonl"
    assert path.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    with open(path) as f:
        return [json.loads(line) for line in f]


def _triton(rows, **match):
    return [r for r in rows
            if r["kind"] == "triton" and all(r.get(k) == v for k, v in match.items())]


def _where(r):
    return f"sm_{r['cc']} {r['family']} {r['case']} {r['kernel_name']} {r['dtype']} {r['size']}"


def test_covers_every_family_dtype_and_target(rows):
    tri = _triton(rows)
    assert {r["family"] for r in tri} == {"contrastive", "sphere", "swav", "sortnet", "dino"}
    assert {r["cc"] for r in tri} == {80, 90}
    for fam in ("sphere", "swav"):
        assert {r["dtype"] for r in tri if r["family"] == fam} == {"bf16", "fp16", "fp32", "fp64"}
    # every launched kernel appears (a launcher that stops launching one would shrink this)
    names = {r["kernel_name"] for r in tri}
    assert names >= {"_lse_fwd_kernel", "_lse_bwd_rows_kernel", "_lse_bwd_cols_kernel",
                     "_sce_fwd_kernel", "_sce_bwd_kernel", "_pair_forward_kernel",
                     "_pair_backward_kernel", "_colstats_kernel", "_rowpass_kernel",
                     "_swav_ce_kernel", "_ss_values_kernel", "_ss_perm_kernel",
                     "_ss_bwd_perm_kernel", "_ss_bwd_values_kernel", "_groco_rows_kernel",
                     "_nearest_kernel"}


def test_every_triton_kernel_compiles(rows):
    bad = [f"{_where(r)}: {r['error']}" for r in _triton(rows) if not r["compiled"]]
    assert not bad, "\n".join(bad)


def test_no_spills_in_any_dtype_or_target(rows):
    bad = [f"{_where(r)}: {r['spill_store_bytes']}+{r['spill_load_bytes']} B at "
           f"{r['registers']} registers" for r in _triton(rows)
           if r["compiled"] and r["spill_store_bytes"] + r["spill_load_bytes"] > 0]
    assert not bad, "\n".join(bad)


def test_every_dtype_in_the_table(rows):
    tri = _triton(rows)
    # every dtype each launcher accepts: float64 too (the gradcheck dtype), in contrastive only
    # by the symmetric schedule's gram launchers; sortnet runs half inputs in float32
    assert all("gram" in r["case"] for r in tri
               if r["family"] == "contrastive" and r["dtype"] == "fp64")
    want = {"contrastive": {"bf16", "fp16", "fp32", "fp64"},
            "sphere": {"bf16", "fp16", "fp32", "fp64"},
            "swav": {"bf16", "fp16", "fp32", "fp64"}, "sortnet": {"fp32", "fp64"},
            "dino": {"fp32", "fp64"}}  # KoLeo's search on normalised rows in the acc dtype
    for fam, dts in want.items():
        assert {r["dtype"] for r in tri if r["family"] == fam} == dts, fam


def test_records_the_toolchain(rows):
    import triton
    tool = [r for r in rows if r["kind"] == "toolchain"]
    assert len(tool) == 1 and tool[0]["triton_version"] == triton.__version__
    assert set(tool[0]["ptxas_version"]) == {"80", "90"}
    assert all(r["triton_version"] == triton.__version__ for r in _triton(rows))


def test_figures_come_from_one_ptxas_command_line_per_target(rows):
    cmds = S.ptxas_command_lines(rows)
    assert set(cmds) == {80, 90}
    for cc, lines in cmds.items():
        assert len(lines) == 1, (cc, lines)
        assert "-v" in lines[0] and f"--gpu-name=sm_{cc}{'a' if cc >= 90 else ''}" in lines[0]
    assert all(r.get("ptxas_options") for r in _triton(rows) if r["compiled"])


_WITNESS = """
import json, os, sys
sys.path.insert(0, {root!r})
from bench import static as S
S._env_for_compile()
for cc, kname, dtype, sub in {cases!r}:
    for fam, label, dn, size, launch, spec, also in S._capture(cc):
        if launch.kernel.__name__ == kname and dn == dtype and sub in label + " " + size:
            job = dict(family=fam, case=label, kernel_name=kname, dtype=dn, size=size, cc=cc,
                       kernel=launch.kernel, args=launch.args, kwargs=launch.kwargs)
            print(json.dumps(S._compile_launch(job)))
            break
"""


def test_figures_are_those_of_the_ptxas_run_triton_makes(rows, tmp_path):
    """A witness in place of ptxas (Triton's own TRITON_PTXAS_PATH knobs) logs every command
    line and log; the rows bench.static records must be exactly those of Triton's one ptxas run
    per kernel (a second run of ptxas with other options, as the check once did, fails here:
    `-arch -v` without `--regAllocOptLevel=2` turned 24-byte spills into 0 on sm_90)."""
    from triton import knobs
    log = tmp_path / "ptxas_calls.jsonl"
    env = _env()
    for var, tool in (("TRITON_PTXAS_PATH", knobs.nvidia.ptxas),
                      ("TRITON_PTXAS_BLACKWELL_PATH", knobs.nvidia.ptxas_blackwell)):
        real = tool.path
        wrapper = tmp_path / f"witness-{os.path.basename(real)}"
        wrapper.write_text(textwrap.dedent(f"""\
            #!{sys.executable}
            import json, subprocess, sys
            res = subprocess.run([{real!r}, *sys.argv[1:]], capture_output=True, text=True)
            sys.stdout.write(res.stdout)
            sys.stderr.write(res.stderr)
            with open({str(log)!r}, "a") as f:
                f.write(json.dumps({{"argv": sys.argv, "log": res.stdout + res.stderr}}) + "\\n")
            sys.exit(res.returncode)
            """))
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
        env[var] = str(wrapper)
    # The kernels where the command line changed the figures (issue 26), on both targets.
    cases = [(90, "_ss_bwd_perm_kernel", "fp32", "cauchy] bitonic,B=256,n=1024"),
             (90, "_lse_bwd_cols_kernel", "fp32", "info_nce_sym"),
             (80, "_ss_bwd_perm_kernel", "fp32", "gaussian] odd_even,B=1024,n=32")]
    res = subprocess.run([sys.executable, "-c", _WITNESS.format(root=ROOT, cases=cases)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    got = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    compiles = [c for c in calls if any(a.endswith(".ptx") for a in c["argv"][1:])]
    assert len(got) == len(cases) and all(r["compiled"] for r in got), got
    # one ptxas run per kernel: Triton's own; nothing re-runs ptxas behind it
    assert len(compiles) == len(cases), [c["argv"] for c in compiles]
    for row, call in zip(got, compiles):
        assert row["ptxas_options"] == S.ptxas_options(call["argv"])
        figures = S._parse_ptxas(call["log"])
        assert {k: row[k] for k in figures} == figures, (row["kernel_name"], figures)
        # ... and the table was produced with the same command line for that target
        table = S.ptxas_command_lines(rows)[row["cc"]]
        assert table == [row["ptxas_options"]], (table, row["ptxas_options"])


def test_committed_tables_for_both_triton_versions_show_no_spill_and_no_failure():
    """bench/results/static (the pinned triton) and bench/results/static/triton-3.6 (the GPU
    machine's): produced from Triton's own ptxas runs, every case compiled, 0 spills."""
    seen = {}
    for sub in ("", "triton-3.6"):
        path = os.path.join(ROOT, "bench", "results", "static", sub, "static.jsonl")
        with open(path) as f:
            got = [json.loads(line) for line in f]
        tool = next(r for r in got if r["kind"] == "toolchain")
        tri = _triton(got)
        assert tri and all(r["compiled"] for r in tri), path
        assert all(r["spill_store_bytes"] + r["spill_load_bytes"] == 0 for r in tri), path
        assert all(r.get("ptxas_options") for r in tri), path
        assert all(len(v) == 1 for v in S.ptxas_command_lines(got).values()), path
        seen[tool["triton_version"].rsplit(".", 1)[0]] = len(tri)
    assert set(seen) == {"3.9", "3.6"}, seen


def test_shared_memory_within_the_block_limit(rows):
    bad = [f"{_where(r)}: {r['shared_bytes']}" for r in _triton(rows)
           if r["shared_bytes"] > S.SMEM_LIMIT[r["cc"]]]
    assert not bad, "\n".join(bad)


def test_gemm_loops_use_tensor_cores(rows):
    gemm = [r for r in _triton(rows) if r["kernel_name"] in S.GEMM_KERNELS]
    assert gemm
    bad = [_where(r) for r in gemm if S.tensor_cores(r) == 0]
    assert not bad, "GEMM loops on scalar FMAs:\n" + "\n".join(bad)
    # fp32 included: tf32x3 keeps float32-level error on the tensor cores
    assert all(S.tensor_cores(r) > 0 for r in gemm if r["dtype"] == "fp32")
    no_wgmma = [_where(r) for r in gemm
                if r["cc"] == 90 and S.wgmma_expected(r) and r["wgmma"] == 0]
    assert not no_wgmma, "\n".join(no_wgmma)
    assert all(r["mma"] > 0 for r in gemm if r["cc"] == 80)


def test_launches_choose_warps_and_stages(rows):
    # Triton's defaults (4 warps, 3 stages) everywhere was a finding: the config functions
    # choose per target, e.g. 8 warps for the 128-row flash-style tiles on Hopper.
    fwd90 = _triton(rows, kernel_name="_lse_fwd_kernel", cc=90)
    assert fwd90 and all(r["num_warps"] == 8 and r["constexprs"]["BLOCK_M"] == 128 for r in fwd90)


def test_no_32bit_address_products(rows):
    found = [r["finding"] for r in rows if r["kind"] == "offset32"]
    assert not found, "\n".join(found)


def test_cuda_sources_compile_with_the_build_flags(rows):
    cuda = [r for r in rows if r["kind"] == "cuda"]
    assert cuda and all(r["compiled"] for r in cuda), [r.get("error") for r in cuda]
    assert {r["cc"] for r in cuda} == {80, 90}
    assert {r["family"] for r in cuda} == {"sortnet", "swav"}
    spill = [r["case"] for r in cuda if r["spill_store_bytes"] + r["spill_load_bytes"] > 0]
    assert not spill, spill


def test_cuda_glue_compiles_against_the_cuda_torch_headers(rows):
    glue = [r for r in rows if r["kind"] == "glue"]
    assert {r["case"] for r in glue} == {"sortnet_cuda_glue.cpp", "swav_cuda_glue.cpp"}
    bad = [f"{r['case']}: {r['error']}" for r in glue if not r["compiled"]]
    assert not bad, "\n".join(bad)
