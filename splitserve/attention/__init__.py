from splitserve.attention.metadata import AttentionMetadata, PrefillSeq

__all__ = ["AttentionMetadata", "PrefillSeq"]
