"""The e-eum cashback engine's command line and settings.

Importing this package sets one process-wide default before anything loads polars:
polars' allocator (jemalloc, with background purging) is told by polars to hand freed
pages back to the system after 0.5 s (`dirty_decay_ms:500,muzzy_decay_ms:1000`, put
before whatever `_RJEM_MALLOC_CONF` already holds; jemalloc takes the last value of each
option), and a bulk job that frees and allocates
hundreds of megabytes a second (the simulation's read, ~20 million payments in chunks of
a million) then pays for every page again: on the 2-core machine, 19 s of a 57-s run was
the kernel zeroing re-faulted pages. With a 30-second decay the pages are reused while a
job runs and still returned half a minute after it ends (docs/performance.md). A value
already in the environment wins. `eum serve`'s workers inherit it.
"""

import os

ALLOCATOR_CONF = "dirty_decay_ms:30000,muzzy_decay_ms:30000"
os.environ.setdefault("_RJEM_MALLOC_CONF", ALLOCATOR_CONF)
