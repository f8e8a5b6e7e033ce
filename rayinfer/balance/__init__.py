"""Load balancing: expert placement (EPLB) and the prefill/decode request-routing policies, as pure functions."""
