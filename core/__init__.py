"""sora-export core: hook specs, domain types, engine, backends, verification, CLI."""

import os

# coremltools draws a tqdm bar for every conversion pass, burying the engine's own progress
# display; tqdm reads TQDM_DISABLE when it is imported, so it must be set this early.
os.environ.setdefault("TQDM_DISABLE", "1")
