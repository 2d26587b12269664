"""Prefill/decode disaggregation (Mooncake): instance roles, KV transfer over
torch.distributed, the front end and its KVCache-centric global scheduler. Modules are
imported where used (`moska --help` stays fast)."""
