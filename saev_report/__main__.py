"""`python -m saev_report ...` is the CLI; it is also what torchrun starts:
`torchrun --nproc-per-node N -m saev_report build SPEC`."""

from saev_report.cli import app

if __name__ == "__main__":
    app()
