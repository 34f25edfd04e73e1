"""`python -m harness [group=choice ...] [key=value ...]`: check the overrides, then run the Hydra app."""

import sys

from harness.config import check_overrides
from methods.base import ConfigError


def main() -> None:
    args = sys.argv[1:]
    if not any(arg.startswith("-") for arg in args):  # Hydra's own flags (-m, --cfg, --help) go straight to Hydra
        try:
            check_overrides(args)
        except ConfigError as error:
            sys.exit(f"prunebench: error: {error}")
    from harness.cli import app

    app()


if __name__ == "__main__":
    main()
