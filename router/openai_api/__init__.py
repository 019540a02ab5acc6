"""The router's OpenAI-compatible HTTP edge: `/v1/models`, `/v1/completions` and
`/v1/chat/completions`, streamed as server-sent events or not.

It owns the HTTP request and response shapes only: each request becomes a `GenerateRequest` and
goes through `GeneratorService.generate`, the same placement, migration and metrics path as gRPC
`Generate`. Imports `router` and `protos`, never torch or the shard.
"""
