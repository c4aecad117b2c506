"""The roles: each an asyncio task with its own MQTT session.

Roles talk only through :mod:`vinyl_mqtt.messages` over MQTT; none imports
another. :mod:`vinyl_mqtt.run` starts the ones a config names.
"""
