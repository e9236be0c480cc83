"""Disaggregated baseline (DistServe / vLLM disaggregated prefill): a prefill-only engine
and a decode-only engine over separate KV pools; each finished prefill's KV pages are
sent to the decode engine through a `KVTransport` before its decode starts."""
