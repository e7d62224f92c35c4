"""The router (conductor): worker registry, request routing, P/D hand-off orchestration."""
