"""Fine-tuning BLIP / BLIP-2 captioners: the modules behind run_captioning.py and the command-line tools."""

import logging

# bitsandbytes tries to fetch an optional CPU 4-bit kernel from the Hub when it is imported and logs a warning when
# it cannot (always, offline); its built-in fallback is what runs. Keep that line out of every command's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
