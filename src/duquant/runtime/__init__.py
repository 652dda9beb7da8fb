"""Fast inference for a policy, underneath the readable model: fused projections, compiled blocks and one CUDA
graph per `sample_actions` call.

    from duquant.runtime import optimize
    fast = optimize(policy, example_obs)          # fuse + compile + capture (CUDA); returns a CapturedPolicy
    actions = fast(obs, noise)                     # one graph replay; same actions as policy.sample_actions

Each step is usable alone (`fuse_projections`, `compile_blocks`, `CapturedPolicy`). None changes the model's
module names, checkpoint keys or numerics beyond floating-point reassociation (see docs/gpu.md for the tolerance).
"""

from duquant.runtime.compile import compile_blocks
from duquant.runtime.fuse import fuse_projections
from duquant.runtime.graph import CapturedPolicy, GraphCaptureError
from duquant.runtime.optimize import optimize

__all__ = ["CapturedPolicy", "GraphCaptureError", "compile_blocks", "fuse_projections", "optimize"]
