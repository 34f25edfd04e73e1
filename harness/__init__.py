"""prunebench: a harness to compare visual-token-pruning methods for multimodal LLMs on accuracy and cost."""
