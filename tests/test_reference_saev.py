"""Equality with the paper's code, saev 0.1.0, run in its own venv (`make reference-venv`).

The reference code runs as a subprocess in that venv: it writes checkpoints in its own format and
takes training steps with its own loop body. This side loads them and takes the same steps with
saev-report's update. Without the venv the test skips, unless SAEV_REPORT_REQUIRE_REFERENCE=1
(set by `make test` and `.ci/run`, which build the venv first), where a missing venv fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saev_report.sae import load_reference_checkpoint
from saev_report.train import optimizer_step

SCRIPT = Path(__file__).parent / "reference" / "saev_train_steps.py"


def reference_python() -> Path:
    """The venv's interpreter: $SAEV_REFERENCE_PYTHON, else the one `make reference-venv` builds."""
    if os.environ.get("SAEV_REFERENCE_PYTHON"):
        return Path(os.environ["SAEV_REFERENCE_PYTHON"])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "saev-report" / "reference-venv" / "saev-0.1.0" / "bin" / "python"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    python = reference_python()
    if not python.exists():
        if os.environ.get("SAEV_REPORT_REQUIRE_REFERENCE") == "1":
            pytest.fail(f"saev 0.1.0's venv is missing at {python}: run `make reference-venv`")
        pytest.skip("saev 0.1.0's venv is not built (`make reference-venv`)")
    out_dir = tmp_path_factory.mktemp("saev-reference")
    env = {**os.environ, "PYTHONPATH": ""}  # the reference venv sees only saev, never this checkout
    subprocess.run([str(python), str(SCRIPT), str(out_dir)], check=True, env=env, cwd=out_dir)
    return out_dir


def test_the_reference_is_saev_0_1_0_not_this_checkout(reference_run):
    trace = torch.load(reference_run / "trace.pt", weights_only=True)
    saev_file = Path(trace["saev_file"])
    assert "site-packages" in saev_file.parts, saev_file
    version = subprocess.run([str(reference_python()), "-c", "import importlib.metadata as m; print(m.version('saev'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == "0.1.0"


def test_a_saev_checkpoint_loads_and_encodes_the_same(reference_run):
    trace = torch.load(reference_run / "trace.pt", weights_only=True)
    sae = load_reference_checkpoint(reference_run / "init" / "sae.pt")
    x_nd = trace["batches"][0]
    xhat_nd, f_nf = sae(x_nd)
    torch.testing.assert_close(f_nf, trace["first"]["f"])
    torch.testing.assert_close(xhat_nd, trace["first"]["xhat"])


def test_training_steps_match_saevs_training_loop(reference_run):
    """Same start, same batches: saev-report's update (loss, parallel-gradient removal, Adam,
    atom renormalisation) lands on saev's weights, and reports its loss terms, step for step."""
    trace = torch.load(reference_run / "trace.pt", weights_only=True)
    sae = load_reference_checkpoint(reference_run / "init" / "sae.pt").train()
    optimizer = torch.optim.Adam(sae.parameters(), lr=trace["lr"])
    for step, x_nd in enumerate(trace["batches"]):
        out, loss = optimizer_step(sae, optimizer, sae.normalize(x_nd), trace["sparsity_coeff"], sparse=False)
        mse, sparsity, l0, l1 = trace["losses"][step].tolist()
        assert out.mse.item() == pytest.approx(mse, rel=1e-5)
        assert loss.item() == pytest.approx(mse + sparsity, rel=1e-5)
        assert out.l0 == pytest.approx(l0, rel=1e-5)
    final = load_reference_checkpoint(reference_run / "final" / "sae.pt")
    for name, theirs in final.named_parameters():
        torch.testing.assert_close(dict(sae.named_parameters())[name], theirs, rtol=1e-4, atol=1e-6, msg=name)


def test_the_sparse_path_takes_the_same_steps(reference_run):
    trace = torch.load(reference_run / "trace.pt", weights_only=True)
    dense = load_reference_checkpoint(reference_run / "init" / "sae.pt").train()
    sparse = load_reference_checkpoint(reference_run / "init" / "sae.pt").train()
    optimizers = [torch.optim.Adam(s.parameters(), lr=trace["lr"]) for s in (dense, sparse)]
    for x_nd in trace["batches"]:
        optimizer_step(dense, optimizers[0], x_nd, trace["sparsity_coeff"], sparse=False)
        optimizer_step(sparse, optimizers[1], x_nd, trace["sparsity_coeff"], sparse=True)
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
