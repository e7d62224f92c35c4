"""The disaggregated runtime: prefill and decode workers, the messages between them and the
router, and the KV hand-over (transfer/)."""
