"""The ALSA file-plugin capture device, for tests (it lives in the package for the demo)."""

from vinyl_mqtt.alsa_file import DTYPES, alsa_file_device, from_raw, to_raw  # noqa: F401
