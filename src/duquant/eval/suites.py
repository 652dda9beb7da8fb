"""LIBERO suites and openpi's per-suite episode limits (no imports: the CLI builds its parser from these)."""

SUITE_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                   "libero_90": 400}  # longest training demos: 193, 254, 270, 505, 373
SUITES = tuple(SUITE_MAX_STEPS)
