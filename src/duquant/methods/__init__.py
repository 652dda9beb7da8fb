"""Transform methods, one module each; registered in ``duquant.registry``. Each module's ``build`` returns the
``LayerTransform`` of one layer (or of layers sharing one input) from its weight and calibration statistics."""
