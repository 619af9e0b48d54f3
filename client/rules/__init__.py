"""The politeness rules: pure decisions about when and how hard fedtray may train.

Contract: every module here is pure (no I/O, no clock of its own: the caller passes
readings and "now") and tested by tables. :mod:`client.rules.budget` turns "in use /
idle / unknown" into a pause or a CPU budget; :mod:`client.rules.pauses` holds the step-
aside, heat, full-screen and schedule rules (the ``schedule`` setting itself is read by
:mod:`client.schedule`, which the tray shares). The session's sources
(:mod:`client.session.politeness`) read the OS and apply what these return.
"""
