"""Upper bounds on what input files and flags may ask for.

Every value here is far beyond any real workload, and each is checked before any work
starts: a value past one is refused in one line naming the limit, instead of running out
of memory (or time) deep inside a simulation. Knob bounds (width, top-k, tree sizes) live
with the knobs in `pipedec_sim.protocol.knobs`.
"""
from __future__ import annotations

import sys

MAX_JSON_DEPTH = 100            # nesting of arrays and objects in any JSON input
MAX_INT_DIGITS = sys.get_int_max_str_digits() or 4300   # Python's int <-> str limit
SNIFF_BYTES = 1 << 20           # how much of a file's first line the format sniffer reads

MAX_PROMPT_LEN = 1_000_000      # tokens in one prompt (traces: prompt_len)
MAX_OUTPUT_LEN = 100_000        # tokens one request generates (trace output, --max-new-tokens)
MAX_TOP_K = 1024                # draft proposals per position (trace and acceptance top_k)
MAX_VOCAB = 10_000_000          # vocabulary size (acceptance models, profiles)
MAX_BETA_PARAM = 1e6            # acceptance alpha and beta (Beta sampling spins past it)
MAX_STAGES = 1024               # pipeline stages (--stages, sweep `stages`)
MAX_SEED = 2**63 - 1            # seeds are integers in [0, MAX_SEED]
MAX_DPI = 1000                  # plot --dpi
MAX_WORKERS = 1024              # sweep / tune --workers

# Simulated time. A run's clock is a float of ms, so a time past these would leave it too
# coarse for the steps it adds up (at 1e300 ms adding 175 ms changes nothing).
MAX_MS = 1e9                    # any one duration in a profile or flag (about 11.6 days)
MIN_GBPS = 1e-6                 # the slowest link (1 kbit/s: a row takes seconds, not eons)
MAX_ARRIVAL_S = 1e6             # when the last request may arrive, in seconds (11.6 days)

# Profile model shapes (target and draft; pipedec_sim.inputs.profile.checks.check_shape_field)
SHAPE_LIMITS = {"layers": 10_000, "hidden": 1_000_000, "heads": 100_000,
                "kv_heads": 100_000, "intermediate": 10_000_000, "vocab": MAX_VOCAB,
                "dtype_bytes": 16}
