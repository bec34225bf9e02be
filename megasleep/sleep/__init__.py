"""Sleep: the chunked wake/sleep forward of docs/sleep.md (loop.py) and its settings (config.py)."""

from megasleep.sleep.config import SleepConfig
from megasleep.sleep.loop import SleepOutput, SleepRunner, sleep_forward

__all__ = ["SleepConfig", "SleepOutput", "SleepRunner", "sleep_forward"]
