"""`python -m uptrain ...`: the `uptrain` command (also what `accelerate launch -m uptrain ...` runs)."""

from .cli import app

if __name__ == "__main__":
    app()
