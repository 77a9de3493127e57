"""Kopf registrations only: every handler calls :mod:`dualpath_operator.reconcile`."""
