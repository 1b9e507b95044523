"""Session state, its rules, and the handlers of every client packet."""

from .message import Message
from .session import Counters, OutFlight, Session, SessionLimits, SessionState

__all__ = ["Counters", "Message", "OutFlight", "Session", "SessionLimits", "SessionState"]
