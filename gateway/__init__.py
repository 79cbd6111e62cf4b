"""hub-gateway: factory sensor data from the local broker to AWS IoT Core, store-and-forward."""

__version__ = "0.1.0"
