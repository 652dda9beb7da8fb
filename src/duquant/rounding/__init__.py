"""Weight roundings, one module each; registered in ``duquant.registry``. Each module's ``round_weight`` turns a
transformed weight W_t [out, in] into a ``QuantizedWeight``; they run in the transformed basis, so every
rounding composes with every transform method."""
