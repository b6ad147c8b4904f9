"""Operate: HTTP health / metrics / admin, Prometheus metrics, the audit log, retention, the child-process guard."""
