"""Simulator evaluation, client side and torch-free: openpi's LIBERO loop against any openpi-compatible policy
server (`libero`), and real-scene observations for calibration (`record`). CLI: `duquant eval libero`,
`duquant record libero` (`cli`)."""
