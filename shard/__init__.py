"""lorafleet shard: one base model plus many LoRA adapters behind gRPC."""
