"""vinyl-mqtt: recognise what is playing on a turntable and tell Home Assistant."""

__version__ = "0.1.0"
