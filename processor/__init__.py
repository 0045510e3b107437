"""cancelproc: applies due service cancellation requests, WHMCS style."""

__version__ = "0.1.0"
