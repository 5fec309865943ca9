"""Launcher of the `uptrain` command from a checkout, for `accelerate launch cli.py train RECIPE ...`.

Installed, the same app is the `uptrain` command and `python -m uptrain` (`accelerate launch -m uptrain ...`).
"""

from uptrain.cli import app

if __name__ == "__main__":
    app()
