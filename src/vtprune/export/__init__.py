"""Export a pruned VLM to ONNX: vision encoder + pruning stage (custom ops with function bodies),
token embedding, and decoder with KV cache, written as one validated bundle."""
