"""twivapi: a terminal toolkit for Twilio + Vapi voice agents."""

__version__ = "0.1.0"
