"""`python -m calq` (and so `torchrun -m calq`): the calq command line."""

from calq.cli.main import app

if __name__ == "__main__":
    app(prog_name="calq")
