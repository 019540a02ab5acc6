"""lorafleet router: places streaming Generate calls on shards (torch-free)."""
