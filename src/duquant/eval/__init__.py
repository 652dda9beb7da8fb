"""Simulator evaluation, client side and torch-free: openpi's LIBERO loop against any openpi-compatible policy
server or an in-process policy, on this machine or a Ray cluster (`libero.evaluate`), and real-scene
observations for calibration (`record`). CLI: `duquant eval libero`, `duquant record libero` (`cli`).

Modules: `config` (EvalConfig, errors), `sim` (LIBERO env + episode loop), `stub` (a fake simulator and
policy for measuring and testing the harness), `policies` (clients), `work` (units of work as event streams),
`runners/` (local, ray; one registry), `records` (the run directory), `stats` + `summary` (tables),
`progress`, `overhead` (harness benchmark).
"""
