"""``python -m bench --help``."""

import sys

if __name__ == "__main__":
    if "cp-decode" in sys.argv[1:] and "--preset" in sys.argv[1:]:  # multi-process: its own driver
        from .cp import main as cp_main

        sys.exit(cp_main())
    if "--backward" in sys.argv[1:]:  # training step (forward + backward): its own driver
        from .training import main as training_main

        sys.exit(training_main())
    from .runner import main

    sys.exit(main())
