"""Portable task packages (``.fedtask``): a model as data, not code.

A package carries a ``torch.export`` program (as its JSON serialization, never pickled),
the weights and, when the server holds the data, the data -- so an installed device
trains a model the operator brings without executing Python it received. The format is
stated in ``docs/task-package.md``; :mod:`client.taskpkg.manifest` is its manifest.

Importing this package never imports torch (the server, the tray and the session read
manifests); only the worker process rebuilds a program.
"""
