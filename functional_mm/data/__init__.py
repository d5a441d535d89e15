"""Data: sources, tokenizers and batching. For now the embedded text corpus used by the main job."""
