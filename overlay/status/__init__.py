"""Status service of every node: JSON status, Prometheus metrics, health, the fleet page and the admin API."""

from overlay.status.admin import load_admin_token
from overlay.status.server import AdminController, StatusProvider, StatusServer, start_status_server

__all__ = ["AdminController", "StatusProvider", "StatusServer", "load_admin_token", "start_status_server"]
