"""``python -m refvlm_training.engine`` / ``torchrun ... -m refvlm_training.engine``: same as `refvlm train`."""
import argparse
import sys

from refvlm_core.errors import RefVLMError
from refvlm_training.engine.train_command import add_arguments, run


def main() -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m refvlm_training.engine"))
    try:
        return run(parser.parse_args())
    except RefVLMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
