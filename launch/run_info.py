"""What launch/*.sh need to know about a run before any rank starts, one value per line:

    <run dir>
    <checkpoint dir>
    <seconds the latest complete checkpoint took to save, or an empty line if there is none>

    python launch/run_info.py [CONFIG.yaml] [key=value ...]

A bad config or override exits 2 with one line on stderr naming it.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from megasleep.config import ConfigError
    from megasleep.train.checkpoint import find_latest, read_marker
    from megasleep.train.config import load_experiment

    config = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if config is not None else argv
    try:
        cfg = load_experiment(config, overrides)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"{exc}", file=sys.stderr)
        return 2
    save_seconds = ""
    tag = find_latest(cfg.checkpoint_path)
    if tag is not None:
        try:
            save_seconds = str(read_marker(cfg.checkpoint_path / tag).get("seconds", ""))
        except (OSError, ValueError):  # an unreadable marker only costs us the margin check
            pass
    print(cfg.run_path)
    print(cfg.checkpoint_path)
    print(save_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
