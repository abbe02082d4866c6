"""The controller's side of the pi0 appliance: numpy and pyzmq, nothing else.

from pi0_client import PolicyClient, ActionChunkBroker
"""

from pi0_client.broker import ActionChunkBroker
from pi0_client.client import (
    BusyError,
    ConnectionDroppedError,
    PolicyClient,
    PolicyError,
    RequestTooLargeError,
    ServerUnavailableError,
    StateOutOfRangeWarning,
)
from pi0_client.metadata import Camera, Metadata, PromptInfo

__all__ = [
    "ActionChunkBroker",
    "BusyError",
    "Camera",
    "ConnectionDroppedError",
    "Metadata",
    "PolicyClient",
    "PolicyError",
    "PromptInfo",
    "RequestTooLargeError",
    "ServerUnavailableError",
    "StateOutOfRangeWarning",
]
